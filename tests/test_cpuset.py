"""cpuset reservations: real cgroups of this host, and cgroup v2 emulated where the host's
cpuset controller is bound to v1.

The real-hierarchy tests work below a parent cgroup each test creates and removes, and move
only processes the test started; nothing else of the machine is touched.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mckmpi.node import cpuset
from mckmpi.node.cpuset import CgroupFS, Hierarchy
from mckmpi.errors import FeatureUnavailable, PartitionError, UsageError
from mckmpi.utility.units import format_cpulist, parse_cpulist

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
_serial = itertools.count()


# --- cgroup v2, emulated -------------------------------------------------------------------


class FakeCgroup2(CgroupFS):
    """cgroup v2 semantics on a plain directory tree: a child gets the cpuset files only when
    its parent's cgroup.subtree_control enables cpuset; a non-root cgroup with processes may
    not enable controllers, nor receive processes once it has; listed pids refuse to move
    like kernel threads (EINVAL); a partition root is valid below the root, below a partition
    root, or when every ancestor's cpuset.cpus.exclusive holds its CPUs (a remote partition,
    Linux >= 6.7); rmdir of a cgroup with processes or children fails with EBUSY. The tree
    lives on disk, so another process can work on it too."""

    def __init__(self, root: Path):
        self.root = root
        self.refuse = {int(x) for x in (root.parent / "refuse").read_text().split()}

    @classmethod
    def build(cls, root: Path, *, cpus: str = "0-3", procs: tuple[int, ...] = (),
              refuse: tuple[int, ...] = ()) -> FakeCgroup2:
        root.mkdir(parents=True)
        for name, value in (("cgroup.controllers", "cpuset cpu memory"), ("cgroup.subtree_control", ""),
                            ("cgroup.procs", _lines(procs)), ("cpuset.cpus.effective", cpus),
                            ("cpuset.mems.effective", "0")):
            (root / name).write_text(value)
        (root.parent / "refuse").write_text(" ".join(map(str, refuse)))
        (root.parent / "mounts").write_text(f"cgroup2 {root} cgroup2 rw,nosuid,nodev 0 0\n")
        return cls(root)

    def hierarchy(self) -> Hierarchy:
        return Hierarchy(2, self.root)

    def add_cgroup(self, path: Path, procs: tuple[int, ...] = ()) -> Path:
        """A cgroup that exists before the test (with processes placed in it directly)."""
        self.mkdir(path)
        (path / "cgroup.procs").write_text(_lines(procs))
        return path

    def mkdir(self, path: Path) -> None:
        path.mkdir()
        enabled = self._get(path.parent, "cgroup.subtree_control")
        for name, value in (("cgroup.controllers", enabled), ("cgroup.subtree_control", ""),
                            ("cgroup.procs", "")):
            (path / name).write_text(value)
        if "cpuset" in enabled.split():
            self._add_cpuset_files(path)

    def rmdir(self, path: Path) -> None:
        if not path.is_dir():
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
        if self._procs(path) or any(p.is_dir() for p in path.iterdir()):
            raise _oserror(errno.EBUSY, path)
        shutil.rmtree(path)

    def write(self, path: Path, text: str) -> None:
        if not path.is_file():
            raise _oserror(errno.ENOENT, path)
        value = text.strip()
        handlers: dict[str, Callable[[Path, str], None]] = {
            "cgroup.subtree_control": self._subtree, "cgroup.procs": self._attach,
            "cpuset.cpus": self._cpus, "cpuset.cpus.partition": self._partition,
        }
        if path.name in handlers:
            handlers[path.name](path.parent, value)
        else:
            path.write_text(value)

    def cgroup_of(self, pid: int, hierarchy: Hierarchy) -> Path | None:
        return next((cg for cg in self._cgroups() if pid in self._procs(cg)), None)

    def _subtree(self, cg: Path, value: str) -> None:
        enabled = self._get(cg, "cgroup.subtree_control").split()
        children = [p for p in cg.iterdir() if p.is_dir()]
        for token in value.split():
            op, ctrl = token[0], token[1:]
            if op == "+":
                if ctrl not in self._get(cg, "cgroup.controllers").split():
                    raise _oserror(errno.ENOENT, cg)
                if cg != self.root and self._procs(cg):
                    raise _oserror(errno.EBUSY, cg)
                if ctrl not in enabled:
                    enabled.append(ctrl)
                    for child in children:
                        if ctrl == "cpuset":
                            self._add_cpuset_files(child)
            else:
                if any(ctrl in self._get(c, "cgroup.subtree_control").split() for c in children):
                    raise _oserror(errno.EBUSY, cg)
                if ctrl in enabled:
                    enabled.remove(ctrl)
                    for child in children:
                        for f in child.glob(f"{ctrl}.*"):
                            f.unlink()
            for child in children:
                (child / "cgroup.controllers").write_text(" ".join(enabled))
        (cg / "cgroup.subtree_control").write_text(" ".join(enabled))

    def _attach(self, cg: Path, value: str) -> None:
        pid = int(value)
        if pid in self.refuse:
            raise _oserror(errno.EINVAL, cg)
        src = self.cgroup_of(pid, self.hierarchy())
        if src is None:
            raise _oserror(errno.ESRCH, cg)
        if cg != self.root and self._get(cg, "cgroup.subtree_control"):
            raise _oserror(errno.EBUSY, cg)
        (src / "cgroup.procs").write_text(_lines(p for p in self._procs(src) if p != pid))
        (cg / "cgroup.procs").write_text(_lines([*self._procs(cg), pid]))

    def _cpus(self, cg: Path, value: str) -> None:
        parent = set(parse_cpulist(self._get(cg.parent, "cpuset.cpus.effective")))
        (cg / "cpuset.cpus").write_text(value)
        effective = set(parse_cpulist(value)) & parent or parent
        (cg / "cpuset.cpus.effective").write_text(format_cpulist(effective))

    def _partition(self, cg: Path, value: str) -> None:
        if value not in ("member", "root"):
            raise _oserror(errno.EINVAL, cg)
        state = value
        below_partition = cg.parent == self.root or self._get(cg.parent, "cpuset.cpus.partition") == "root"
        if value == "root" and not below_partition:
            mine = set(parse_cpulist(self._get(cg, "cpuset.cpus.exclusive")))
            ancestors = [a for a in cg.parents if self.root in a.parents]
            if not mine or any(not mine <= set(parse_cpulist(self._get(a, "cpuset.cpus.exclusive", "")))
                               for a in ancestors):
                state = "root invalid (Invalid cpu list in cpuset.cpus.exclusive)"
        (cg / "cpuset.cpus.partition").write_text(state)

    def _add_cpuset_files(self, cg: Path) -> None:
        effective = self._get(cg.parent, "cpuset.cpus.effective")
        for name, value in (("cpuset.cpus", ""), ("cpuset.mems", ""), ("cpuset.cpus.exclusive", ""),
                            ("cpuset.cpus.partition", "member"), ("cpuset.cpus.effective", effective),
                            ("cpuset.mems.effective", "0")):
            (cg / name).write_text(value)

    def _get(self, cg: Path, name: str, default: str | None = None) -> str:
        f = cg / name
        if default is not None and not f.exists():
            return default
        return f.read_text().strip()

    def _procs(self, cg: Path) -> list[int]:
        return [int(x) for x in self._get(cg, "cgroup.procs").split()]

    def _cgroups(self) -> list[Path]:
        return [self.root, *sorted(p for p in self.root.rglob("*") if p.is_dir())]


def _lines(ids) -> str:
    return "".join(f"{i}\n" for i in ids)


def _oserror(code: int, path: Path) -> OSError:
    return OSError(code, os.strerror(code), str(path))


def fake_snapshot(root: Path) -> dict[str, str]:
    """Every file of the emulated tree; task lists sorted (the kernel promises no order)."""
    snap = {}
    for f in sorted(root.rglob("*")):
        if f.is_file():
            text = f.read_text().strip()
            if f.name == "cgroup.procs":
                text = " ".join(sorted(text.split()))
            snap[str(f.relative_to(root))] = text
    return snap


@pytest.fixture
def root_only():
    if os.geteuid() != 0:
        pytest.skip("cpuset reservations need root")


@pytest.fixture
def fake(tmp_path: Path, root_only) -> FakeCgroup2:
    """A cgroup2 root distributing nothing yet, holding pids 1 and 40 and kernel thread 2."""
    return FakeCgroup2.build(tmp_path / "cgroup2", procs=(1, 2, 40), refuse=(2,))


# --- v2 on the emulated tree ---------------------------------------------------------------


def test_v2_system_wide_round_trip_restores_the_tree(fake: FakeCgroup2, tmp_path: Path):
    before = fake_snapshot(fake.root)
    state = tmp_path / "state"
    r = cpuset.reserve([0], [1, 2, 3], system_wide=True, state_dir=state,
                       hierarchy=fake.hierarchy(), fs=fake)
    base = fake.root / "mckmpi"
    assert (fake.root / "cgroup.subtree_control").read_text().split() == ["cpuset"]
    assert (base / "cgroup.subtree_control").read_text().split() == ["cpuset"]
    assert (base / "linux" / "cpuset.cpus.effective").read_text() == "0"
    assert (base / "lwk" / "cpuset.cpus.effective").read_text() == "1-3"
    assert r.exclusive and (base / "lwk" / "cpuset.cpus.partition").read_text() == "root"
    assert sorted(map(int, (base / "linux" / "cgroup.procs").read_text().split())) == [1, 40]
    assert (fake.root / "cgroup.procs").read_text().split() == ["2"]
    assert (r.moved, r.refused) == (2, 1)
    [st] = cpuset.status(state_dir=state, fs=fake)
    assert st.tasks == {"linux": 2, "lwk": 0} and st.cpus == {"linux": "0", "lwk": "1-3"}

    summary = cpuset.release(state_dir=state, fs=fake)
    assert summary.ok and summary.restored == 2 and len(summary.removed) == 3
    assert fake_snapshot(fake.root) == before
    assert list(state.iterdir()) == []


def test_v2_parent_with_processes(fake: FakeCgroup2, tmp_path: Path):
    """cgroup v2's no-internal-process rule: a parent holding processes cannot distribute
    cpuset, unless system-wide mode moves its processes out first."""
    fake.write(fake.root / "cgroup.subtree_control", "+cpuset")
    job = fake.add_cgroup(fake.root / "job", procs=(300, 301))
    before = fake_snapshot(fake.root)
    state = tmp_path / "state"
    with pytest.raises(UsageError, match="holds processes.*undone"):
        cpuset.reserve([0], [1], parent=job, state_dir=state, hierarchy=fake.hierarchy(), fs=fake)
    assert fake_snapshot(fake.root) == before and list(state.iterdir()) == []

    r = cpuset.reserve([0], [1], parent=job, system_wide=True, state_dir=state,
                       hierarchy=fake.hierarchy(), fs=fake)
    assert (job / "mckmpi" / "linux" / "cgroup.procs").read_text().split() == ["300", "301"]
    # The LWK side cannot be a partition below `job`: the reason is kept, the attempt undone.
    assert not r.exclusive and "Invalid cpu list" in r.exclusive_note
    assert (job / "mckmpi" / "lwk" / "cpuset.cpus.partition").read_text() == "member"
    assert cpuset.release(state_dir=state, fs=fake).ok
    assert fake_snapshot(fake.root) == before


def test_v2_attach_and_release(fake: FakeCgroup2, tmp_path: Path):
    elsewhere = fake.add_cgroup(fake.root / "user", procs=(77,))
    before = fake_snapshot(fake.root)
    state = tmp_path / "state"
    r = cpuset.reserve([0, 1], [2, 3], state_dir=state, hierarchy=fake.hierarchy(), fs=fake)
    assert (fake.root / "cgroup.procs").read_text().split() == ["1", "2", "40"]  # nothing moved
    cpuset.attach(cpuset.load(state_dir=state), "lwk", 77, fs=fake)
    assert fake.cgroup_of(77, r.hierarchy) == r.path("lwk")
    with pytest.raises(UsageError, match="does not exist"):
        cpuset.attach(r, "lwk", 999, fs=fake)
    assert cpuset.release(state_dir=state, fs=fake).restored == 1
    assert fake.cgroup_of(77, r.hierarchy) == elsewhere
    assert fake_snapshot(fake.root) == before


# --- hierarchy detection ---------------------------------------------------------------------


def test_detect_v2_without_cpuset(tmp_path: Path):
    fake = FakeCgroup2.build(tmp_path / "cgroup2")
    (fake.root / "cgroup.controllers").write_text("hugetlb")
    with pytest.raises(FeatureUnavailable, match="offers hugetlb.*no cgroup v1 cpuset"):
        cpuset.detect(mounts=tmp_path / "mounts")
    (fake.root / "cgroup.controllers").write_text("cpuset hugetlb")
    assert cpuset.detect(mounts=tmp_path / "mounts") == Hierarchy(2, fake.root)


def test_detect_hybrid_says_cpuset_is_bound_to_v1(tmp_path: Path):
    v2 = tmp_path / "unified"
    v2.mkdir()
    (v2 / "cgroup.controllers").write_text("hugetlb")
    mounts = tmp_path / "mounts"
    mounts.write_text(f"cgroup {tmp_path}/cpu\\040set cgroup rw,relatime,cpuset 0 0\n"
                      f"cgroup2 {v2} cgroup2 rw 0 0\n")
    assert cpuset.detect(mounts=mounts) == Hierarchy(1, tmp_path / "cpu set")
    with pytest.raises(FeatureUnavailable, match=r"bound to the cgroup v1 hierarchy at .*cpu set"):
        cpuset.detect(2, mounts=mounts)


def test_detect_this_host():
    """On this host (hybrid: cpuset in v1, a cgroup2 beside it) v2 must say why it cannot."""
    try:
        h = cpuset.detect()
    except FeatureUnavailable:
        pytest.skip("this host has no cpuset controller at all")
    if h.version == 1 and any(line.split()[2] == "cgroup2"
                              for line in Path("/proc/self/mounts").read_text().splitlines()):
        with pytest.raises(FeatureUnavailable, match="bound to the cgroup v1"):
            cpuset.detect(2)
    assert (h.mount / "cgroup.procs").is_file()


# --- the real hierarchy ----------------------------------------------------------------------


@pytest.fixture
def real(root_only) -> Hierarchy:
    try:
        h = cpuset.detect()
    except FeatureUnavailable as exc:
        pytest.skip(str(exc))
    if h.version == 2 and "cpuset" not in (h.mount / "cgroup.subtree_control").read_text().split():
        pytest.skip("the cgroup2 root does not distribute cpuset; these tests leave the host's root alone")
    if len(parse_cpulist((h.mount / h.effective_cpus_file).read_text().strip())) < 2:
        pytest.skip("needs two CPUs")
    return h


@pytest.fixture
def parent(real: Hierarchy) -> Iterator[Path]:
    """A parent cgroup of the test's own, removed (with anything left below it) afterwards."""
    top = real.mount / f"mckmpi-test-{os.getpid()}-{next(_serial)}"
    os.mkdir(top)
    try:
        if real.version == 1:
            for name in ("cpuset.cpus", "cpuset.mems"):
                CgroupFS().write(top / name, (real.mount / name).read_text().strip())
        yield top
    finally:
        _remove_tree(real, top)


def _remove_tree(h: Hierarchy, top: Path) -> None:
    below = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
    for cg in [*below, top]:
        for tid in (cg / h.tasks_file).read_text().split():  # only the test's processes live here
            try:
                CgroupFS().write(h.mount / h.tasks_file, tid)
            except ProcessLookupError:
                pass
        os.rmdir(cg)


@pytest.fixture
def spawn(parent: Path) -> Iterator[Callable[..., subprocess.Popen]]:
    """Start `sleep` processes owned by the test (placed in a cgroup if asked); all are
    killed before the parent cgroup is removed."""
    started: list[subprocess.Popen] = []

    def start(cgroup: Path | None = None, argv: tuple[str, ...] = ("sleep", "60"),
              **kw) -> subprocess.Popen:
        p = subprocess.Popen(argv, **kw)
        started.append(p)
        if cgroup is not None:
            CgroupFS().write(cgroup / "cgroup.procs", str(p.pid))
        return p

    yield start
    for p in started:
        p.kill()
        p.wait(timeout=10)
        for pipe in (p.stdin, p.stdout):
            if pipe:
                pipe.close()


def snapshot(h: Hierarchy, top: Path) -> dict[str, object]:
    """The cgroups at the hierarchy's root, and the files that matter below the test's
    parent (task lists sorted)."""
    names = {1: ("cpuset.cpus", "cpuset.mems", "cpuset.cpu_exclusive", "cpuset.effective_cpus", "tasks",
                 "cgroup.procs"),
             2: ("cgroup.subtree_control", "cgroup.controllers", "cpuset.cpus", "cpuset.cpus.effective",
                 "cpuset.cpus.exclusive", "cpuset.cpus.partition", "cgroup.procs")}[h.version]
    snap: dict[str, object] = {"root cgroups": sorted(p.name for p in h.mount.iterdir() if p.is_dir())}
    for name in names[:3]:
        f = h.mount / name
        if f.is_file():
            snap[f"root/{name}"] = f.read_text().strip()
    for cg in [top, *sorted(p for p in top.rglob("*") if p.is_dir())]:
        for name in names:
            f = cg / name
            if f.is_file():
                text = f.read_text().split()
                if name in ("tasks", "cgroup.procs"):
                    text.sort()
                snap[f"{cg.relative_to(top)}/{name}"] = text
    return snap


def cpus_allowed(pid: int) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split()[1]
    raise AssertionError(f"no Cpus_allowed_list for {pid}")


def test_round_trip_leaves_the_tree_unchanged(real: Hierarchy, parent: Path, tmp_path: Path):
    if real.version == 1:
        try:
            CgroupFS().write(parent / "cpuset.cpu_exclusive", "1")
        except OSError as exc:
            pytest.skip(f"cannot make the test parent exclusive here: {exc}")
    before = snapshot(real, parent)
    state = tmp_path / "state"
    r = cpuset.reserve([0], [1], state_dir=state, parent=parent, hierarchy=real)
    assert r.state_file == state / "mckmpi.json" and r.complete
    assert r.path("lwk") == parent / "mckmpi" / "lwk" and r.path("lwk").is_dir()
    assert (r.path("linux") / real.effective_cpus_file).read_text().strip() == "0"
    assert (r.path("lwk") / real.effective_cpus_file).read_text().strip() == "1"
    if real.version == 1:
        assert r.exclusive, r.exclusive_note
        assert (r.path("lwk") / "cpuset.cpu_exclusive").read_text().strip() == "1"
        assert (r.path("lwk") / "cpuset.mems").read_text() == (parent / "cpuset.mems").read_text()
    [st] = cpuset.status(state_dir=state)
    assert st.reservation == r and st.tasks == {"linux": 0, "lwk": 0} and not st.missing
    with pytest.raises(UsageError, match=f"already reserved.*{state / 'mckmpi.json'}"):
        cpuset.reserve([0], [1], state_dir=state, parent=parent, hierarchy=real)

    summary = cpuset.release(state_dir=state)
    assert summary.ok and len(summary.removed) == 3, summary.describe()
    assert snapshot(real, parent) == before
    assert not (state / "mckmpi.json").exists()
    again = cpuset.release(state_dir=state)
    assert not again.found and again.ok
    assert cpuset.status(state_dir=state) == []


@pytest.mark.parametrize("linux,lwk,match", [
    ([0], [4096], "CPU 4096 is not in the cpuset of"),
    ([0, 1], [1], "overlap on CPU 1"),
    ([0], [], "no LWK CPUs"),
])
def test_refuses_bad_cpus_without_changing_anything(real: Hierarchy, parent: Path, tmp_path: Path,
                                                    linux, lwk, match):
    before = snapshot(real, parent)
    with pytest.raises(PartitionError, match=match):
        cpuset.reserve(linux, lwk, state_dir=tmp_path, parent=parent, hierarchy=real)
    assert snapshot(real, parent) == before and list(tmp_path.iterdir()) == []


def test_needs_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(UsageError, match="needs root"):
        cpuset.reserve([0], [1], state_dir=tmp_path)
    with pytest.raises(UsageError, match="needs root"):
        cpuset.release(state_dir=tmp_path)


FORK_ON_REQUEST = """
import os, sys, time
sys.stdin.readline()
pid = os.fork()
if pid:
    print(pid, flush=True)
time.sleep(60)
"""


def test_attach_moves_a_child_into_the_lwk_cpuset(real: Hierarchy, parent: Path, spawn, tmp_path: Path):
    child = spawn(argv=(sys.executable, "-c", FORK_ON_REQUEST), stdin=subprocess.PIPE,
                  stdout=subprocess.PIPE, text=True)
    home = CgroupFS().cgroup_of(child.pid, real)
    allowed = cpus_allowed(child.pid)
    assert allowed != "1"
    r = cpuset.reserve([0], [1], state_dir=tmp_path, parent=parent, hierarchy=real)
    if real.version == 1:  # the test parent is not cpu_exclusive, so the LWK side cannot be
        assert not r.exclusive and "not cpu_exclusive" in r.exclusive_note
    cpuset.attach(r, "lwk", child.pid)
    assert CgroupFS().cgroup_of(child.pid, real) == r.path("lwk")
    assert cpus_allowed(child.pid) == "1"
    assert str(child.pid) in (r.path("lwk") / "cgroup.procs").read_text().split()

    # A process the attached one forks lands in the LWK cpuset too, with no record of its own.
    child.stdin.write("fork\n")
    child.stdin.flush()
    grandchild = int(child.stdout.readline())
    try:
        assert CgroupFS().cgroup_of(grandchild, real) == r.path("lwk")
        summary = cpuset.release(state_dir=tmp_path)
        assert summary.ok and (summary.restored, summary.to_parent) == (1, 1), summary.describe()
        assert CgroupFS().cgroup_of(child.pid, real) == home
        assert cpus_allowed(child.pid) == allowed
        assert CgroupFS().cgroup_of(grandchild, real) == parent  # where reserve took the cpusets from
    finally:
        os.kill(grandchild, signal.SIGKILL)


def test_system_wide_moves_foreign_tasks_only_when_asked(real: Hierarchy, parent: Path, spawn,
                                                         tmp_path: Path):
    """Processes mckmpi did not start (here: sleepers placed in the test's parent cgroup) stay
    put unless system-wide mode is asked for; then they return with their own affinity."""
    pinned, free = spawn(parent), spawn(parent)
    os.sched_setaffinity(pinned.pid, {1})
    outside = spawn()
    outside_home = CgroupFS().cgroup_of(outside.pid, real)
    before = snapshot(real, parent)

    r = cpuset.reserve([0], [1], state_dir=tmp_path, parent=parent, hierarchy=real)
    assert r.moved == 0
    assert {CgroupFS().cgroup_of(p.pid, real) for p in (pinned, free)} == {parent}
    assert cpuset.release(state_dir=tmp_path).ok

    r = cpuset.reserve([0], [1], state_dir=tmp_path, parent=parent, hierarchy=real, system_wide=True)
    assert r.system_wide and r.moved == 2 and r.refused == 0
    for p in (pinned, free):
        assert CgroupFS().cgroup_of(p.pid, real) == r.path("linux")
        assert cpus_allowed(p.pid) == "0"
    assert CgroupFS().cgroup_of(outside.pid, real) == outside_home

    summary = cpuset.release(state_dir=tmp_path)
    assert summary.ok and summary.restored == 2
    assert snapshot(real, parent) == before
    assert (cpus_allowed(pinned.pid), cpus_allowed(free.pid)) == ("1", "0-1")


CRASHING_RESERVE = r"""
import json, os, signal, sys, time
from pathlib import Path

args = json.loads(sys.argv[1])
sys.path.insert(0, args["tests"])
from mckmpi.node import cpuset
from test_cpuset import FakeCgroup2

base = FakeCgroup2 if args["fake"] else cpuset.CgroupFS


class Crashing(base):
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

    def mkdir(self, path):
        super().mkdir(path)
        self._count()


fs = Crashing(Path(args["fake"])) if args["fake"] else Crashing()
hierarchy = cpuset.Hierarchy(args["version"], Path(args["mount"]))
cpuset.reserve([0], [1], name="crash", system_wide=True, parent=Path(args["parent"]),
               state_dir=Path(args["state"]), hierarchy=hierarchy, fs=fs)
print("reserved", flush=True)
time.sleep(60)
"""


def _reserve_and_die(h: Hierarchy, top: Path, state: Path, crash_at: int | None,
                     fake: Path | None = None) -> None:
    """Reserve in another process that is SIGKILLed right after its `crash_at`-th change to
    the cgroup tree (mkdir or write, done or refused), or once the reservation is complete."""
    args = {"tests": str(TESTS), "fake": str(fake) if fake else None, "crash_at": crash_at,
            "parent": str(top), "state": str(state), "version": h.version, "mount": str(h.mount)}
    p = subprocess.Popen([sys.executable, "-c", CRASHING_RESERVE, json.dumps(args)], cwd=ROOT,
                         stdout=subprocess.PIPE, text=True)
    try:
        if crash_at is None:
            assert p.stdout is not None and p.stdout.readline() == "reserved\n"
            p.kill()
        assert p.wait(timeout=30) == -signal.SIGKILL
    finally:
        p.kill()
        p.wait(timeout=10)
        if p.stdout:
            p.stdout.close()


# v1 changes: mkdir, cpus, mems of <name> (1-3), linux (4-6), lwk (7-9), cpu_exclusive (10),
# one move per task (11-12). A crash right after a change finds it recorded or not at all.
@pytest.mark.parametrize("crash_at", [1, 7, 11, None])
def test_release_after_a_crash(real: Hierarchy, parent: Path, spawn, tmp_path: Path, crash_at):
    tasks = [spawn(parent), spawn(parent)]
    before = snapshot(real, parent)
    state = tmp_path / "state"
    _reserve_and_die(real, parent, state, crash_at)
    [st] = cpuset.status(state_dir=state)
    assert st.reservation.complete == (crash_at is None)

    summary = cpuset.release("crash", state_dir=state)
    assert summary.found and summary.ok, summary.describe()
    assert snapshot(real, parent) == before
    assert all(CgroupFS().cgroup_of(t.pid, real) == parent for t in tasks)
    assert list(state.iterdir()) == []


# v2 changes: three mkdirs (1-3), three moves (4-6, the kernel thread refuses at 5), +cpuset
# in the root and in <name> (7-8), three cpuset.cpus (9-11), two cpus.exclusive and the
# partition (12-14).
@pytest.mark.parametrize("crash_at", [1, 4, 7, 13, None])
def test_v2_release_after_a_crash(fake: FakeCgroup2, tmp_path: Path, crash_at):
    before = fake_snapshot(fake.root)
    state = tmp_path / "state"
    _reserve_and_die(fake.hierarchy(), fake.root, state, crash_at, fake=fake.root)
    summary = cpuset.release("crash", state_dir=state, fs=fake)
    assert summary.found and summary.ok, summary.describe()
    assert fake_snapshot(fake.root) == before
    assert list(state.iterdir()) == []


def test_refuses_a_cgroup_it_did_not_create(real: Hierarchy, parent: Path, tmp_path: Path):
    os.mkdir(parent / "mckmpi")
    with pytest.raises(UsageError, match="already exists and no state file"):
        cpuset.reserve([0], [1], state_dir=tmp_path, parent=parent, hierarchy=real)
    assert (parent / "mckmpi").is_dir() and list(tmp_path.iterdir()) == []


def test_two_reservations_side_by_side(real: Hierarchy, parent: Path, tmp_path: Path):
    cpuset.reserve([0], [1], name="a", state_dir=tmp_path, parent=parent, hierarchy=real)
    cpuset.reserve([1], [0], name="b", state_dir=tmp_path, parent=parent, hierarchy=real)
    assert [s.reservation.name for s in cpuset.status(state_dir=tmp_path)] == ["a", "b"]
    assert [s.reservation.name for s in cpuset.status("b", state_dir=tmp_path)] == ["b"]
    assert cpuset.release("a", state_dir=tmp_path).ok and cpuset.release("b", state_dir=tmp_path).ok
    assert not cpuset.release("a", state_dir=tmp_path).found
    assert [p.name for p in parent.iterdir() if p.is_dir()] == []
