"""Isolation of LWK cores: what needs a reboot, refusals, and the byte-for-byte round trip of
every setting it touches on this host (also after SIGKILL at any point, and for one job)."""

from __future__ import annotations

import dataclasses
import errno
import glob
import json
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fixtures import APPS, ROOT, mckmpi, mpirun
from mckmpi.errors import FeatureUnavailable, UsageError
from mckmpi.node import cpuset, isolation
from mckmpi.node.isolation import KernelFiles, Paths
from mckmpi.trace.reader import open_run

TESTS = Path(__file__).resolve().parent


def test_boot_advice_reads_the_command_line_up_to_the_init_arguments():
    params = isolation.boot_advice([0], [1, 2, 3], "quiet nohz_full=1-3 irqaffinity=0,1 -- rcu_nocbs=1-3")
    by = {p.name: p for p in params}
    assert by["nohz_full"].ok and by["nohz_full"].wanted == "nohz_full=1-3"
    assert not by["irqaffinity"].ok and by["irqaffinity"].current == "0,1"
    assert not by["rcu_nocbs"].ok and by["rcu_nocbs"].current == ""  # after "--": init's
    assert by["isolcpus"].wanted == "isolcpus=managed_irq,domain,1-3"
    text = isolation.describe_boot(params)
    assert text.startswith("needs a reboot with rcu_nocbs=1-3 isolcpus=managed_irq,domain,1-3 "
                           "irqaffinity=0 ")
    assert "nohz_full=1-3" not in text.split("(")[0]
    done = "nohz_full=1 rcu_nocbs=1 isolcpus=managed_irq,domain,1 irqaffinity=0"
    assert isolation.describe_boot(isolation.boot_advice([0], [1], done)).startswith(
        "the kernel command line isolates")


# --- on a copy of the kernel's files --------------------------------------------------------


def _fake_tree(tmp_path: Path) -> Paths:
    proc, cpu = tmp_path / "proc", tmp_path / "cpu"
    (proc / "irq").mkdir(parents=True)
    (proc / "irq" / "default_smp_affinity").write_text("f\n")
    for n, actions in ((1, ["i8042"]), (9, []), (30, ["nvme0q1"])):
        (proc / "irq" / str(n)).mkdir()
        (proc / "irq" / str(n) / "smp_affinity_list").write_text("0-3\n")
        for a in actions:
            (proc / "irq" / str(n) / a).mkdir()
    flags = {2: isolation.PF_KTHREAD, 10: isolation.PF_KTHREAD,
             11: isolation.PF_KTHREAD | isolation.PF_NO_SETAFFINITY, 12: 0}
    for pid, f in flags.items():
        (proc / str(pid)).mkdir()
        fields = ["S"] + ["0"] * 5 + [str(f)] + ["0"] * 12 + [str(1000 + pid)] + ["0"] * 20
        (proc / str(pid) / "stat").write_text(f"{pid} (task {pid}) " + " ".join(fields) + "\n")
    for c in range(4):
        (cpu / f"cpu{c}" / "power").mkdir(parents=True)
        (cpu / f"cpu{c}" / "power" / "pm_qos_resume_latency_us").write_text("0\n")
    wq = tmp_path / "wq"
    wq.write_text("f\n")
    return Paths(proc=proc, cpu=cpu, workqueue=wq)


class FakeKernel(KernelFiles):
    """Real files, emulated thread affinities; IRQ 30 is managed (EIO), as nvme queues are."""

    def __init__(self) -> None:
        self.affinities = {2: (0, 1, 2, 3), 10: (2, 3), 11: (0, 1, 2, 3), 12: (0, 1, 2, 3)}

    def write(self, path: Path, text: str) -> None:
        if path.parent.name == "30":
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        path.write_text(text)  # a kernel file takes the whole value

    def affinity(self, tid: int) -> tuple[int, ...]:
        return self.affinities[tid]

    def set_affinity(self, tid: int, cpus) -> None:
        self.affinities[tid] = tuple(sorted(cpus))


def _files(root: Path) -> dict[str, str]:
    return {str(p): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def test_apply_moves_what_may_move_lists_refusals_and_restores_every_byte(tmp_path: Path, root_only):
    paths, fs = _fake_tree(tmp_path), FakeKernel()
    before, affinities = _files(tmp_path), dict(fs.affinities)
    state = tmp_path / "state"
    done = isolation.apply("t", [0, 1], [2, 3], state_dir=state, paths=paths, fs=fs)
    assert (paths.proc / "irq" / "1" / "smp_affinity_list").read_text() == "0-1"
    assert (paths.proc / "irq" / "default_smp_affinity").read_text() == "3"
    assert paths.workqueue.read_text() == "3"
    assert all((paths.cpu / f"cpu{c}/power/pm_qos_resume_latency_us").read_text() == "n/a"
               for c in range(4))
    # kthreadd and a movable kernel thread move (one bound to 2-3 gets all Linux cores);
    # PF_NO_SETAFFINITY threads and user tasks stay
    assert fs.affinities == {2: (0, 1), 10: (0, 1), 11: (0, 1, 2, 3), 12: (0, 1, 2, 3)}
    assert [w for w, _ in done.refused] == ["IRQ 30 (nvme0q1)"]
    assert "manages this interrupt's affinity" in done.refused[0][1]
    with pytest.raises(Exception, match="already applied"):
        isolation.apply("t", [0, 1], [2, 3], state_dir=state, paths=paths, fs=fs)
    with pytest.raises(Exception, match="isolation 't' is already applied on this host"):
        isolation.apply("u", [0, 1], [2, 3], state_dir=state, paths=paths, fs=fs)
    summary = isolation.restore("t", state_dir=state, paths=paths, fs=fs)
    assert summary.ok, summary.describe()
    after = _files(tmp_path)
    assert {k: v for k, v in after.items() if "/state" not in k} == before
    assert fs.affinities == affinities
    assert not isolation.restore("t", state_dir=state, paths=paths, fs=fs).found


def test_load_balancing_v1_stops_up_to_the_mount_and_names_other_balancing_cpusets(
        tmp_path: Path, root_only):
    paths, fs = _fake_tree(tmp_path), FakeKernel()
    mount = tmp_path / "cpuset"
    base = mount / "parent" / "res"
    for cg, cpus in ((mount, "0-3"), (mount / "parent", "0-3"), (base, "0-3"),
                     (base / "linux", "0-1"), (base / "lwk", "2-3"), (mount / "docker", "1-2")):
        cg.mkdir(parents=True, exist_ok=True)
        (cg / "cpuset.cpus").write_text(cpus + "\n")
        (cg / "cpuset.sched_load_balance").write_text("1\n")
    before = _files(tmp_path)
    done = isolation.apply("t", [0, 1], [2, 3], state_dir=tmp_path / "s", paths=paths, fs=fs,
                           cpusets=(1, mount, base, base / "lwk"))
    for cg in (base / "lwk", base, mount / "parent", mount):
        assert (cg / "cpuset.sched_load_balance").read_text() == "0", cg
    assert (base / "linux" / "cpuset.sched_load_balance").read_text() == "1\n"
    assert ("load balancing of LWK cpus in " + str(mount / "docker")) in [w for w, _ in done.refused]
    assert isolation.restore("t", state_dir=tmp_path / "s", paths=paths, fs=fs).ok
    assert {k: v for k, v in _files(tmp_path).items() if "/s/" not in k} == before


def test_load_balancing_v2_makes_the_lwk_cpuset_an_isolated_partition(tmp_path: Path, root_only):
    paths, fs = _fake_tree(tmp_path), FakeKernel()
    lwk = tmp_path / "unified" / "res" / "lwk"
    lwk.mkdir(parents=True)
    (lwk / "cpuset.cpus.partition").write_text("root\n")
    isolation.apply("t", [0, 1], [2, 3], state_dir=tmp_path / "s", paths=paths, fs=fs,
                    cpusets=(2, tmp_path / "unified", lwk.parent, lwk))
    assert (lwk / "cpuset.cpus.partition").read_text() == "isolated"
    assert isolation.restore("t", state_dir=tmp_path / "s", paths=paths, fs=fs).ok
    assert (lwk / "cpuset.cpus.partition").read_text() == "root\n"


def test_sweep_restores_isolations_whose_owner_is_gone(tmp_path: Path, root_only):
    paths, fs = _fake_tree(tmp_path), FakeKernel()
    before = _files(paths.proc)
    dead = subprocess.Popen(["true"])
    dead.wait(timeout=10)
    isolation.apply("run-x", [0, 1], [2, 3], state_dir=tmp_path / "s", owner=dead.pid, paths=paths, fs=fs)
    isolation.apply("mine", [0, 1], [2, 3], state_dir=tmp_path / "s2", owner=None, paths=paths, fs=fs)
    swept = isolation.sweep(tmp_path / "s", paths=paths, fs=fs)
    assert [s.name for s in swept] == ["run-x"] and swept[0].ok
    assert isolation.sweep(tmp_path / "s2", paths=paths, fs=fs) == []  # no owner: a reservation's
    isolation.restore("mine", state_dir=tmp_path / "s2", paths=paths, fs=fs)
    assert _files(paths.proc) == before


def _openers(file: Path) -> list[int]:
    """The processes that have `file` open."""
    found = []
    for link in glob.glob("/proc/[0-9]*/fd/*"):
        try:
            if os.readlink(link) == str(file):
                found.append(int(link.split("/")[2]))
        except OSError:
            pass  # gone meanwhile
    return found


def _without_per_cpu_qos(tmp_path: Path) -> Paths:
    paths = _fake_tree(tmp_path)
    (paths.cpu / "cpu1" / "power" / "pm_qos_resume_latency_us").unlink()
    dma = tmp_path / "cpu_dma_latency"
    dma.write_bytes(b"")
    return dataclasses.replace(paths, dma_latency=dma)


def test_idle_policy_falls_back_to_a_held_cpu_dma_latency_request(tmp_path: Path, root_only):
    paths, fs = _without_per_cpu_qos(tmp_path), FakeKernel()
    before = _files(paths.cpu)
    irqs = _files(paths.proc)
    done = isolation.apply("t", [0, 1], [2, 3], state_dir=tmp_path / "s", paths=paths, fs=fs,
                           idle_only=True)
    what = f"PM QoS of every CPU ({paths.dma_latency} held at 0 us)"
    assert done.changed == [what] and done.refused == [] and done.scope == "idle"
    assert paths.dma_latency.read_bytes() == struct.pack("=i", 0)  # the request: 0 us
    holders = _openers(paths.dma_latency)
    assert len(holders) == 1  # held open while the isolation lasts
    assert _files(paths.cpu) == before and _files(paths.proc) == irqs  # per-CPU files untouched
    # an idle-only isolation does not stand in for a full one, and stacks with one
    assert isolation.covering(tmp_path / "s", [0, 1], [2, 3]) is None
    assert isolation.covering(tmp_path / "s", [0, 1], [2, 3], idle_only=True).name == "t"
    full = isolation.apply("u", [0, 1], [2, 3], state_dir=tmp_path / "s", paths=paths, fs=fs)
    assert "unbound workqueues" in full.changed and what in full.changed  # its own holder
    assert isolation.restore("u", state_dir=tmp_path / "s", paths=paths, fs=fs).ok
    assert len(_openers(paths.dma_latency)) == 1
    summary = isolation.restore("t", state_dir=tmp_path / "s", paths=paths, fs=fs)
    assert summary.ok and summary.restored == [what], summary.describe()
    assert _openers(paths.dma_latency) == [] and not Path(f"/proc/{holders[0]}").exists()


def test_idle_policy_fallback_refused_is_recorded_and_holds_nothing(tmp_path: Path, root_only):
    paths, fs = _without_per_cpu_qos(tmp_path), FakeKernel()
    paths.dma_latency.unlink()
    paths.dma_latency.mkdir()  # a file the holder cannot write
    done = isolation.apply("t", [0, 1], [2, 3], state_dir=tmp_path / "s", paths=paths, fs=fs)
    what = f"PM QoS of every CPU ({paths.dma_latency} held at 0 us)"
    assert [w for w, _ in done.refused] == ["IRQ 30 (nvme0q1)", what]
    assert "Is a directory" in done.refused[1][1]
    paths.dma_latency.rmdir()
    done = isolation.apply("u", [0, 1], [2, 3], state_dir=tmp_path / "s2", paths=paths, fs=fs,
                           idle_only=True)
    assert [w for w, _ in done.refused] == ["idle policy"] and done.changed == []
    assert isolation.restore("t", state_dir=tmp_path / "s", paths=paths, fs=fs).ok
    assert isolation.restore("u", state_dir=tmp_path / "s2", paths=paths, fs=fs).ok


# --- on this host -----------------------------------------------------------------------------


@pytest.fixture
def root_only():
    if os.geteuid() != 0:
        pytest.skip("needs root")


def host_settings() -> dict[str, object]:
    """Every setting isolation may touch on this host: files by text, kernel threads by
    affinity, the cpuset hierarchy's load-balancing flags."""
    files = glob.glob("/proc/irq/*/smp_affinity*") + ["/proc/irq/default_smp_affinity"]
    files += glob.glob("/sys/devices/system/cpu/cpu[0-9]*/power/pm_qos_resume_latency_us")
    files += [str(Paths().workqueue)]
    try:
        h = cpuset.detect()
        files += glob.glob(f"{h.mount}/**/cpuset.sched_load_balance", recursive=True)
        files += glob.glob(f"{h.mount}/**/cpuset.cpus.partition", recursive=True)
    except FeatureUnavailable:
        pass  # no cpuset hierarchy: isolation touches no cpuset file
    out: dict[str, object] = {}
    for f in files:
        try:
            out[f] = Path(f).read_text()
        except OSError:
            pass
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                flags = int((p / "stat").read_text().rsplit(")", 1)[1].split()[6])
                if flags & isolation.PF_KTHREAD:
                    out[f"affinity of kernel thread {p.name}"] = sorted(os.sched_getaffinity(int(p.name)))
            except (OSError, IndexError):
                pass
    return out


def _put_back(saved: dict[str, object]) -> None:
    """The safety net: whatever a failed test left, the saved values go back."""
    for key, value in saved.items():
        try:
            if key.startswith("affinity of kernel thread "):
                os.sched_setaffinity(int(key.rsplit(" ", 1)[1]), value)  # type: ignore[arg-type]
            elif Path(key).read_text() != value:
                KernelFiles().write(Path(key), str(value))
        except OSError:
            pass


def _same(a: dict[str, object], b: dict[str, object]) -> list[str]:
    """Keys whose values differ (kernel threads that came or went meanwhile are not compared;
    cpuset files of other tests' cgroups that came or went neither)."""
    return [k for k in a.keys() & b.keys() if a[k] != b[k]]


@pytest.fixture
def host(root_only) -> Iterator[dict[str, object]]:
    """This host's settings before the test; put back in any case afterwards."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs")
    saved = host_settings()
    try:
        yield saved
    finally:
        _put_back(saved)


@pytest.fixture
def parent(host) -> Iterator[Path]:
    h = cpuset.detect()
    top = h.mount / f"mckmpi-isolation-test-{os.getpid()}"
    os.mkdir(top)
    try:
        if h.version == 1:
            for name in ("cpuset.cpus", "cpuset.mems"):
                KernelFiles().write(top / name, (h.mount / name).read_text().strip())
        yield top
    finally:
        for d in sorted(top.rglob("*"), key=lambda p: -len(p.parts)):
            if d.is_dir():
                os.rmdir(d)
        os.rmdir(top)


def test_host_round_trip_restores_every_file_byte_for_byte(host, parent: Path, tmp_path: Path):
    state = tmp_path / "state"
    r = cpuset.reserve([0], [1], name="iso", state_dir=state, parent=parent)
    try:
        done = isolation.apply("iso", [0], [1], state_dir=state,
                               cpusets=(r.hierarchy.version, r.hierarchy.mount,
                                        r.parent / r.name, r.path("lwk")))
        now = host_settings()
        assert _same(host, now), "isolation changed nothing"
        assert Path("/proc/irq/default_smp_affinity").read_text().strip() == "1"
        assert Path("/sys/devices/system/cpu/cpu1/power/pm_qos_resume_latency_us").read_text() == "n/a\n"
        if r.hierarchy.version == 1:
            assert (r.path("lwk") / "cpuset.sched_load_balance").read_text() == "0\n"
        assert done.complete
        assert isolation.restore("iso", state_dir=state).ok
    finally:
        isolation.restore("iso", state_dir=state)
        cpuset.release("iso", state_dir=state)
    assert _same(host, host_settings()) == []


CRASHING_APPLY = r"""
import json, os, signal, sys
from pathlib import Path
from mckmpi.node import isolation

args = json.loads(sys.argv[1])


class Crashing(isolation.KernelFiles):
    changes = 0

    def _count(self):
        Crashing.changes += 1
        if Crashing.changes == args["crash_at"]:
            os.kill(os.getpid(), signal.SIGKILL)

    def write(self, path, text):
        try:
            super().write(path, text)
        finally:
            self._count()

    def set_affinity(self, tid, cpus):
        try:
            super().set_affinity(tid, cpus)
        finally:
            self._count()


isolation.apply("crash", [0], [1], state_dir=Path(args["state"]), fs=Crashing())
print("applied", flush=True)
signal.pause()
"""


# changes in order: default IRQ affinity (1), one per IRQ, the workqueue mask, one per kernel
# thread, then one PM QoS file per CPU; None: killed after completing.
@pytest.mark.parametrize("crash_at", [1, 4, 25, 40, None])
def test_restore_after_sigkill_at_any_point(host, tmp_path: Path, crash_at):
    state = tmp_path / "state"
    p = subprocess.Popen([sys.executable, "-c", CRASHING_APPLY,
                          json.dumps({"crash_at": crash_at, "state": str(state)})],
                         cwd=ROOT, stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        if crash_at is None:
            assert p.stdout is not None and p.stdout.readline() == "applied\n"
            p.kill()
        assert p.wait(timeout=60) == -signal.SIGKILL
    finally:
        p.kill()
        p.wait(timeout=10)
        if p.stdout:
            p.stdout.close()
    [found] = isolation.status(state)
    assert found.complete == (crash_at is None)
    summary = isolation.restore("crash", state_dir=state)
    assert summary.ok, summary.describe()
    assert _same(host, host_settings()) == []
    assert isolation.status(state) == []


def _state_files() -> set[Path]:
    return set(cpuset.default_state_dir().glob(f"run-*{isolation.SUFFIX}"))


def test_run_isolate_restores_at_the_end_of_the_job(host, tmp_path: Path):
    before = _state_files()
    out = tmp_path / "run.h5"
    proc = mpirun(1, "run", "--mode", "lwk", "--isolate", "--offload", "none", "--out", str(out),
                  "--", str(APPS / "fwq.py"), "--samples", "200", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert _same(host, host_settings()) == []
    assert _state_files() == before
    with open_run(out) as run:
        assert "quiet" in run.group_attrs("kernel")["isolation"]


SLEEPER = """\
import os, sys, time
from pathlib import Path
Path(sys.argv[1]).write_text(str(os.getpid()))
time.sleep(60)
"""


def test_run_isolate_is_restored_when_the_rank_is_killed(host, tmp_path: Path):
    app, pid_file = tmp_path / "sleeper.py", tmp_path / "pid"
    app.write_text(SLEEPER)
    job = subprocess.Popen(["mpiexec", "-n", "1", "--bind-to", "none", sys.executable, "-m", "mckmpi",
                            "run", "--mode", "lwk", "--isolate", "--offload", "none", "--out",
                            str(tmp_path), "--", str(app), str(pid_file)],
                           env={**os.environ, "PYTHONPATH": str(ROOT), "OMPI_ALLOW_RUN_AS_ROOT": "1",
                                "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline and job.poll() is None, "the job did not start"
            time.sleep(0.1)
        assert _same(host, host_settings()), "the job is not isolated"
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        job.wait(timeout=60)
        deadline = time.monotonic() + 30
        while _same(host, host_settings()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _same(host, host_settings()) == []
    finally:
        job.kill()
        job.wait(timeout=30)


def test_isolation_needs_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(UsageError, match="needs root"):
        isolation.apply("t", [0], [1], state_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_isolate_in_linux_mode_is_one_line(tmp_path: Path):
    proc = mckmpi("run", "--mode", "linux", "--isolate", "--out", str(tmp_path), "--",
                  str(APPS / "fwq.py"), "--samples", "5", timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("mckmpi: error:")]
    assert len(lines) == 1 and "--isolate" in lines[0] and "Traceback" not in proc.stderr


def test_a_job_inside_an_isolated_reservation_uses_the_reservations_isolation(host, tmp_path: Path):
    name = f"isolation-test-{os.getpid()}"
    reserved = mckmpi("partition", "reserve", "--name", name, "--linux-cores", "1")
    assert reserved.returncode == 0, reserved.stderr
    try:
        assert "settings changed" in reserved.stdout and "needs a reboot" in reserved.stdout
        status = mckmpi("partition", "status", "--name", name)
        assert f"isolation '{name}'" in status.stdout
        out = tmp_path / "run.h5"
        proc = mpirun(1, "run", "--mode", "lwk", "--cpuset", name, "--isolate", "--offload", "none",
                      "--mem", "16M", "--out", str(out), "--", str(APPS / "fwq.py"), "--samples", "50",
                      timeout=120)
        assert proc.returncode == 0, proc.stderr
        with open_run(out) as run:
            assert f"isolation '{name}'" in run.group_attrs("kernel")["isolation"]
        assert _state_files() == set()  # no isolation of its own
    finally:
        released = mckmpi("partition", "release", "--name", name)
        assert released.returncode == 0, released.stdout + released.stderr
    assert "undone" in released.stdout
    assert _same(host, host_settings()) == []


def test_jobs_of_one_split_share_an_applied_isolation(tmp_path: Path, root_only):
    paths, fs = _fake_tree(tmp_path), FakeKernel()
    state = tmp_path / "s"
    first = isolation.apply("run-1", [0, 1], [2, 3], state_dir=state, paths=paths, fs=fs)
    assert isolation.covering(state, [0, 1], [3]) is not None  # same Linux cores, fewer LWK
    assert isolation.covering(state, [0], [2, 3]) is None  # another split
    with isolation.isolated([0, 1], [2, 3], state_dir=state) as held:
        assert held.name == first.name  # shared, not stacked
    assert [i.name for i in isolation.status(state)] == ["run-1"]  # not restored by the sharer
    assert isolation.restore("run-1", state_dir=state, paths=paths, fs=fs).ok
