"""LWK cores as quiet as the running kernel allows without a reboot, and restored exactly.

McKernel takes its cores away from Linux entirely. A cpuset only keeps other tasks off; these
run-time settings take away what else Linux would do there:

- device IRQs: every ``/proc/irq/N/smp_affinity_list`` and ``/proc/irq/default_smp_affinity``
  moved to the Linux cores (IRQs the kernel manages itself refuse, and are listed with why);
- unbound workqueues (``/sys/devices/virtual/workqueue/cpumask``) and every kernel thread
  that may move (not PF_NO_SETAFFINITY) to the Linux cores;
- scheduler load balancing off on the LWK cores: cgroup v1 ``cpuset.sched_load_balance = 0``
  on the LWK cpuset and its ancestors (the Linux cpuset keeps balancing), cgroup v2 the LWK
  cpuset as an ``isolated`` partition (given a reservation);
- idle: ``/sys/devices/system/cpu/cpuN/power/pm_qos_resume_latency_us = n/a`` on the LWK and
  Linux cores (no idle state with an exit latency: a core wakes at once for the proxy); on a
  kernel without those files, a request of 0 us on ``/dev/cpu_dma_latency`` (every CPU: the
  only scope it has), which lasts as long as its file stays open: a holder process keeps it
  open until the isolation is restored (`apply(idle_only=True)`: this part alone).

What only the kernel command line can do (nohz_full, rcu_nocbs, isolcpus, irqaffinity) is
detected and reported with the exact parameters (`boot_advice`), never faked.

Every change is recorded in a JSON state file under /run/mckmpi *before* it is made (the
file's text as it was, a thread's affinity as it was), so `restore` puts back every byte
from the state file alone, also after the process that applied them was killed. A job's
isolation (`mckmpi run --isolate`) names its owner process; `sweep` restores those whose
owner is gone, and a guard process restores them the moment the owner dies.
"""

from __future__ import annotations

import errno
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mckmpi.errors import UsageError
from mckmpi.node import statefile
from mckmpi.node.partition import NodePlan
from mckmpi.trace.tracer import Tracer
from mckmpi.utility.units import format_cpulist, parse_cpulist

_FORMAT = 1
SUFFIX = ".isolation"
#: task flags (/proc/PID/stat field 9): a kernel thread; one whose affinity may not change.
PF_KTHREAD, PF_NO_SETAFFINITY = 0x00200000, 0x04000000
#: pm_qos_resume_latency_us: "n/a" = no exit latency tolerated (only polling idle).
QOS_NO_LATENCY = "n/a"


class KernelFiles:
    """The kernel's files and thread affinities. One object, so a test can interpose (stop
    the process after its k-th change) and a host without some file can be emulated."""

    def read(self, path: Path) -> str:
        return path.read_text()

    def write(self, path: Path, text: str) -> None:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, text.encode())  # one write(2): procfs/sysfs parse each call whole
        finally:
            os.close(fd)

    def exists(self, path: Path) -> bool:
        return path.exists()

    def affinity(self, tid: int) -> tuple[int, ...]:
        return tuple(sorted(os.sched_getaffinity(tid)))

    def set_affinity(self, tid: int, cpus: Iterable[int]) -> None:
        os.sched_setaffinity(tid, set(cpus))


KERNEL = KernelFiles()


@dataclass(frozen=True)
class Paths:
    """Where the kernel keeps the settings (a test points them at a copy)."""

    proc: Path = Path("/proc")
    cpu: Path = Path("/sys/devices/system/cpu")
    workqueue: Path = Path("/sys/devices/virtual/workqueue/cpumask")
    #: the system-wide PM QoS request (used when the per-CPU files are missing)
    dma_latency: Path = Path("/dev/cpu_dma_latency")


@dataclass
class Isolation:
    """What a state file says was done."""

    name: str
    state_file: Path
    linux_cpus: tuple[int, ...]
    lwk_cpus: tuple[int, ...]
    owner: int | None
    complete: bool
    changed: list[str]
    refused: list[tuple[str, str]]
    #: "full", or "idle": only the idle policy (`apply(idle_only=True)`)
    scope: str = "full"

    def describe(self) -> str:
        owner = f", for process {self.owner}" if self.owner else ""
        state = "" if self.complete else "; INCOMPLETE: stopped before finishing"
        quiet = "quiet" if self.scope == "full" else "kept out of deep idle (idle policy only)"
        head = (f"isolation '{self.name}': lwk cpus {format_cpulist(self.lwk_cpus)} {quiet}, "
                f"linux cpus {format_cpulist(self.linux_cpus)} take the rest{owner}: "
                f"{len(self.changed)} settings changed, {len(self.refused)} refused{state}")
        lines = [head]
        lines += [f"  refused {what}: {why}" for what, why in self.refused]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "state_file": str(self.state_file),
                "linux_cpus": format_cpulist(self.linux_cpus),
                "lwk_cpus": format_cpulist(self.lwk_cpus), "owner": self.owner,
                "complete": self.complete, "scope": self.scope, "changed": self.changed,
                "refused": [{"what": w, "reason": r} for w, r in self.refused]}


@dataclass
class RestoreSummary:
    name: str
    state_file: Path
    found: bool = False
    restored: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        if not self.found:
            return f"no isolation '{self.name}' (no state file {self.state_file})"
        text = f"isolation '{self.name}' undone: {len(self.restored)} settings restored"
        if self.problems:
            text += f"; NOT undone ({self.state_file} kept): " + "; ".join(self.problems)
        return text


# --- applying ------------------------------------------------------------------------------


def state_path(name: str, state_dir: Path) -> Path:
    return state_dir / f"{name}{SUFFIX}"


def apply(name: str, linux_cpus: Iterable[int], lwk_cpus: Iterable[int], *, state_dir: Path,
          cpusets: tuple[int, Path, Path, Path] | None = None, owner: int | None = None,
          paths: Paths = Paths(), fs: KernelFiles = KERNEL, idle_only: bool = False) -> Isolation:
    """Quiet `lwk_cpus`: move IRQs, workqueues and kernel threads to `linux_cpus`, stop load
    balancing on the LWK cpuset (`cpusets` = (cgroup version, hierarchy mount, the
    reservation's directory, its LWK cpuset) when there is a reservation) and keep both
    sides out of deep idle (`idle_only`: only that). Refusals are recorded, not errors;
    anything else undoes what was done and raises."""
    if os.geteuid() != 0:
        raise UsageError("isolating LWK cores needs root: IRQ affinities, workqueue masks and "
                         "PM QoS files are writable by root only")
    linux, lwk = tuple(sorted(set(linux_cpus))), tuple(sorted(set(lwk_cpus)))
    if not linux or not lwk or set(linux) & set(lwk):
        raise UsageError(f"isolation needs disjoint, non-empty Linux ({format_cpulist(linux)}) "
                         f"and LWK ({format_cpulist(lwk)}) cores")
    path = state_path(name, state_dir)
    with locked(state_dir):
        if path.exists():
            raise UsageError(f"isolation '{name}' is already applied (state file {path})")
        # an idle policy alone stacks with anything: it only ever sets the PM QoS files to
        # the one value "n/a" and records a file only when it changes it, so whichever
        # finishes first, none restores a value another one wrote
        others = [] if idle_only else [i.name for i in status(state_dir) if i.scope == "full"]
        if others:
            # two isolations restored out of order would leave the second one's settings
            raise UsageError(f"isolation '{others[0]}' is already applied on this host (state "
                             f"{state_dir}): one at a time, so each restores exactly what it "
                             f"changed; release it first (mckmpi partition release --name "
                             f"{others[0]})")
        data: dict[str, Any] = {"format": _FORMAT, "name": name, "linux_cpus": format_cpulist(linux),
                                "lwk_cpus": format_cpulist(lwk), "owner": owner,
                                "owner_start": _start_time(paths.proc, owner) if owner else None,
                                "started": time.time(), "complete": False, "files": [],
                                "threads": [], "holders": [], "refused": [],
                                "scope": "idle" if idle_only else "full"}
        statefile.save(path, data)
        try:
            if not idle_only:
                _irqs(data, path, paths, linux, fs)
                _set_file(data, path, fs, paths.workqueue, _mask(linux), "unbound workqueues")
                _kthreads(data, path, paths, linux, fs)
                if cpusets is not None:
                    _load_balance(data, path, fs, cpusets, lwk)
            _idle(data, path, paths, fs, linux + lwk)
        except BaseException:
            _undo(path, data, fs)
            raise
        data["complete"] = True
        statefile.save(path, data)
    return _isolation(path, data)


def _idle(data: dict, path: Path, paths: Paths, fs: KernelFiles, cpus: tuple[int, ...]) -> None:
    """No idle state with an exit latency on `cpus`: their per-CPU PM QoS files, else (a
    kernel without them) a 0 us request on /dev/cpu_dma_latency held for as long as the
    isolation lasts."""
    files = {cpu: paths.cpu / f"cpu{cpu}" / "power" / "pm_qos_resume_latency_us" for cpu in cpus}
    if all(fs.exists(f) for f in files.values()):
        for cpu, f in files.items():
            _set_file(data, path, fs, f, QOS_NO_LATENCY, f"PM QoS of cpu{cpu}")
        return
    what = f"PM QoS of every CPU ({paths.dma_latency} held at 0 us)"
    if not fs.exists(paths.dma_latency):
        per_cpu = paths.cpu / "cpuN" / "power" / "pm_qos_resume_latency_us"
        why = f"neither per-CPU PM QoS ({per_cpu}) nor {paths.dma_latency} exists on this kernel"
        data["refused"].append(["idle policy", why])
        statefile.save(path, data)
        return
    _hold(data, path, paths.dma_latency, what)


#: holder processes this process started, by pid (reaped when restored from here)
_HOLDERS: dict[int, subprocess.Popen] = {}


def _hold(data: dict, path: Path, file: Path, what: str) -> None:
    """Start a process that holds `file`'s 0 us request open; it is recorded before it asks
    (it waits for a go that only comes once the state file names it), so a crash never leaves
    an unrecorded request behind."""
    code = ("import sys; from mckmpi.node.isolation import _hold_request; "
            "_hold_request(sys.argv[1])")
    holder = subprocess.Popen([sys.executable, "-c", code, str(file)], start_new_session=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    data["holders"].append({"pid": holder.pid, "start": _start_time(Path("/proc"), holder.pid),
                            "file": str(file), "what": what})
    statefile.save(path, data)
    assert holder.stdin is not None and holder.stdout is not None
    holder.stdin.write(b"go")
    holder.stdin.close()
    reply = holder.stdout.readline().decode().strip()
    holder.stdout.close()
    if reply == "held":
        _HOLDERS[holder.pid] = holder
        return
    holder.wait(10)
    data["holders"].pop()
    data["refused"].append([what, reply or "the holder process exited"])
    statefile.save(path, data)


def _hold_request(file: str) -> None:
    """The holder process: once told to go, write a 0 us request and keep the file open
    until killed (the kernel drops the request when the file closes, also on a crash)."""
    if sys.stdin.buffer.read(2) != b"go":
        return  # the process that started this one died before recording it
    try:
        fd = os.open(file, os.O_WRONLY)
        os.write(fd, struct.pack("=i", 0))
    except OSError as exc:
        print(f"writing {file}: {os.strerror(exc.errno) if exc.errno else exc}", flush=True)
        return
    print("held", flush=True)
    null = os.open(os.devnull, os.O_RDWR)
    for std in (0, 1):
        os.dup2(null, std)
    while True:
        signal.pause()


def _release(entry: dict) -> bool:
    """End a holder process (its request goes with its file); False if it would not end."""
    pid, proc = entry["pid"], Path("/proc")
    if _start_time(proc, pid) != entry["start"] or _zombie(proc, pid):
        _HOLDERS.pop(pid, None)
        return True  # gone already: its request went with it
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    mine = _HOLDERS.pop(pid, None)
    if mine is not None:
        try:
            mine.wait(10)
        except subprocess.TimeoutExpired:
            return False
        return True
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if _start_time(proc, pid) != entry["start"] or _zombie(proc, pid):
            return True
        time.sleep(0.01)
    return False


def _zombie(proc: Path, pid: int) -> bool:
    try:
        text = (proc / str(pid) / "stat").read_text()
    except OSError:
        return True
    return text[text.rindex(")") + 2:].split()[0] in ("Z", "X")


def _mask(cpus: Iterable[int]) -> str:
    """A CPU list as the kernel's hexadecimal mask text."""
    return format(sum(1 << c for c in cpus), "x")


def _irqs(data: dict, path: Path, paths: Paths, linux: tuple[int, ...], fs: KernelFiles) -> None:
    irq_dir = paths.proc / "irq"
    _set_file(data, path, fs, irq_dir / "default_smp_affinity", _mask(linux),
              "default IRQ affinity", mask=True)
    numbers = sorted(int(p.name) for p in irq_dir.iterdir() if p.name.isdigit())
    for n in numbers:
        f = irq_dir / str(n) / "smp_affinity_list"
        actions = sorted(p.name for p in (irq_dir / str(n)).iterdir() if p.is_dir())
        _set_file(data, path, fs, f, format_cpulist(linux),
                  f"IRQ {n}" + (f" ({', '.join(actions)})" if actions else ""))


def _set_file(data: dict, path: Path, fs: KernelFiles, file: Path, value: str, what: str,
              mask: bool = False) -> None:
    """Record `file`'s text, then write `value` (skipped when it already holds it)."""
    if not fs.exists(file):
        data["refused"].append([what, f"{file} does not exist on this kernel"])
        statefile.save(path, data)
        return
    before = fs.read(file)
    current = parse_cpulist(before.strip()) if file.name.endswith("_list") else None
    if before.strip() == value or (current is not None and current == parse_cpulist(value)) or (
            mask and int(before.strip().replace(",", ""), 16) == int(value, 16)):
        return
    data["files"].append({"file": str(file), "before": before, "what": what})
    statefile.save(path, data)
    try:
        fs.write(file, value)
    except OSError as exc:
        data["files"].pop()
        data["refused"].append([what, _why(exc, file)])
        statefile.save(path, data)


def _why(exc: OSError, file: Path) -> str:
    if exc.errno in (errno.EIO, errno.EPERM) and "irq" in file.parts:
        return "the kernel manages this interrupt's affinity itself (a managed or per-CPU IRQ)"
    if exc.errno == errno.EINVAL and "irq" in file.parts:
        return "the interrupt controller cannot route it to the Linux cores"
    return f"writing {file}: {os.strerror(exc.errno) if exc.errno else exc}"


def _kthreads(data: dict, path: Path, paths: Paths, linux: tuple[int, ...], fs: KernelFiles) -> None:
    """Every kernel thread that may move goes to the Linux cores (those bound to a NUMA node
    keep the part of it that is Linux's). kthreadd first: threads it creates later inherit."""
    pids = sorted(int(p.name) for p in paths.proc.iterdir() if p.name.isdigit())
    pids.sort(key=lambda p: p != 2)
    for pid in pids:
        stat = _stat(paths.proc, pid)
        if stat is None:
            continue
        comm, flags, start = stat
        if not flags & PF_KTHREAD or flags & PF_NO_SETAFFINITY:
            continue
        try:
            before = fs.affinity(pid)
        except OSError:
            continue
        if set(before) <= set(linux):
            continue
        target = tuple(sorted(set(before) & set(linux))) or linux
        data["threads"].append({"tid": pid, "start": start, "comm": comm,
                                "before": format_cpulist(before)})
        statefile.save(path, data)
        try:
            fs.set_affinity(pid, target)
        except OSError as exc:
            data["threads"].pop()
            if exc.errno != errno.ESRCH:
                data["refused"].append([f"kernel thread {comm} ({pid})",
                                        os.strerror(exc.errno) if exc.errno else str(exc)])
            statefile.save(path, data)


def _stat(proc: Path, pid: int) -> tuple[str, int, int] | None:
    """(comm, flags, start time) of a task, None when it is gone."""
    try:
        text = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    comm = text[text.index("(") + 1:text.rindex(")")]
    fields = text[text.rindex(")") + 2:].split()
    return comm, int(fields[6]), int(fields[19])


def _start_time(proc: Path, pid: int) -> int | None:
    stat = _stat(proc, pid)
    return None if stat is None else stat[2]


def _load_balance(data: dict, path: Path, fs: KernelFiles, cpusets: tuple[int, Path, Path, Path],
                  lwk: tuple[int, ...]) -> None:
    version, mount, base, lwk_cg = cpusets
    if version == 2:
        _set_file(data, path, fs, lwk_cg / "cpuset.cpus.partition", "isolated",
                  "cgroup v2 isolated partition of the LWK cpuset")
        return
    # v1: the CPUs of a balancing cpuset are balanced, so every cpuset above the LWK one stops
    # balancing; the Linux cpuset (balancing by default) keeps its cores balanced.
    chain = [lwk_cg, base, *[p for p in base.parents if p == mount or mount in p.parents]]
    for cg in chain:
        _set_file(data, path, fs, cg / "cpuset.sched_load_balance", "0",
                  f"load balancing of cpuset {cg}")
    for other in _balancing_cpusets(fs, mount, set(chain), lwk):
        data["refused"].append([f"load balancing of LWK cpus in {other}",
                                "another cpuset covers LWK cores and balances them"])
    statefile.save(path, data)


def _balancing_cpusets(fs: KernelFiles, mount: Path, skip: set[Path], lwk: tuple[int, ...]) -> list[Path]:
    found = []
    for d, dirs, _ in os.walk(mount):
        p = Path(d)
        if p in skip or not fs.exists(p / "cpuset.sched_load_balance"):
            continue
        if fs.read(p / "cpuset.sched_load_balance").strip() == "1" and set(lwk) & set(
                parse_cpulist(fs.read(p / "cpuset.cpus").strip())):
            found.append(p)
    return found


# --- restoring -----------------------------------------------------------------------------


def restore(name: str, *, state_dir: Path, paths: Paths = Paths(),
            fs: KernelFiles = KERNEL) -> RestoreSummary:
    """Undo everything the state file records, newest first. Idempotent."""
    path = state_path(name, state_dir)
    if not state_dir.is_dir():
        return RestoreSummary(name, path)
    with locked(state_dir):
        data = _load(path)
        if data is None:
            return RestoreSummary(name, path)
        return _undo(path, data, fs, paths)


def _undo(path: Path, data: dict, fs: KernelFiles, paths: Paths = Paths()) -> RestoreSummary:
    s = RestoreSummary(data["name"], path, found=True)
    for entry in reversed(data.get("holders", [])):
        if _release(entry):
            s.restored.append(entry["what"])
        else:
            s.problems.append(f"ending process {entry['pid']}, which holds {entry['file']}")
    for entry in reversed(data["files"]):
        file = Path(entry["file"])
        try:
            if fs.exists(file) and fs.read(file) != entry["before"]:
                fs.write(file, entry["before"])
                s.restored.append(entry["what"])
        except OSError as exc:
            s.problems.append(f"restoring {file}: {os.strerror(exc.errno) if exc.errno else exc}")
    for entry in reversed(data["threads"]):
        if _start_time(paths.proc, entry["tid"]) != entry["start"]:
            continue  # the thread ended (its id may be someone else's now)
        try:
            fs.set_affinity(entry["tid"], parse_cpulist(entry["before"]))
            s.restored.append(f"kernel thread {entry['comm']}")
        except ProcessLookupError:
            pass
        except OSError as exc:
            s.problems.append(f"restoring the affinity of {entry['comm']} ({entry['tid']}): "
                              f"{os.strerror(exc.errno) if exc.errno else exc}")
    if s.ok:
        path.unlink(missing_ok=True)
    return s


def sweep(state_dir: Path, paths: Paths = Paths(), fs: KernelFiles = KERNEL) -> list[RestoreSummary]:
    """Restore the isolations of jobs whose owner process is gone (killed before its end)."""
    done = []
    for found in status(state_dir):
        if found.owner is not None and not _alive(paths.proc, found):
            done.append(restore(found.name, state_dir=state_dir, paths=paths, fs=fs))
    return done


def _alive(proc: Path, found: Isolation) -> bool:
    data = _load(found.state_file) or {}
    start = None if found.owner is None else _start_time(proc, found.owner)
    return start is not None and start == data.get("owner_start")


def status(state_dir: Path) -> list[Isolation]:
    """Every isolation recorded in `state_dir`."""
    if not state_dir.is_dir():
        return []
    out = []
    for p in sorted(state_dir.glob(f"*{SUFFIX}")):
        data = _load(p)
        if data is not None:
            out.append(_isolation(p, data))
    return out


def guard(name: str, state_dir: Path, owner: int) -> subprocess.Popen:
    """A process outside the job (own session) that restores `name` as soon as `owner` exits,
    however it exits; when the owner restored it first there is nothing left to do."""
    code = ("import sys; from pathlib import Path; from mckmpi.node.isolation import _guard; "
            "_guard(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]))")
    return subprocess.Popen([sys.executable, "-c", code, name, str(state_dir), str(owner)],
                            start_new_session=True, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def _guard(name: str, state_dir: Path, owner: int) -> None:
    try:
        fd = os.pidfd_open(owner)
    except ProcessLookupError:
        fd = None
    if fd is not None:
        import select

        select.select([fd], [], [])
        os.close(fd)
    restore(name, state_dir=state_dir)


@contextmanager
def isolated(linux_cpus: Iterable[int], lwk_cpus: Iterable[int], name: str | None = None,
             state_dir: Path | None = None, idle_only: bool = False) -> Iterator[Isolation]:
    """`lwk_cpus` isolated (`idle_only`: only kept out of deep idle, with the Linux cores)
    for the duration of a `with` block (a benchmark's case), owned by this process and
    restored in any case; a failed restore is an error."""
    from mckmpi.node.cpuset import default_state_dir

    state_dir = state_dir or default_state_dir()
    held = covering(state_dir, linux_cpus, lwk_cpus, idle_only)
    if held is not None:  # another owner's isolation of the same split: use it as it is
        yield held
        return
    name = name or f"pid-{os.getpid()}"
    applied = apply(name, linux_cpus, lwk_cpus, state_dir=state_dir, owner=os.getpid(),
                    idle_only=idle_only)
    try:
        yield applied
    finally:
        summary = restore(name, state_dir=state_dir)
        if not summary.ok:
            raise RuntimeError(summary.describe())


def covering(state_dir: Path, linux_cpus: Iterable[int], lwk_cpus: Iterable[int],
             idle_only: bool = False) -> Isolation | None:
    """An applied, complete isolation that already quiets `lwk_cpus` with the same Linux
    cores (concurrent jobs of one split share it instead of stacking a second one); one that
    holds only the idle policy covers only what asks for no more (`idle_only`)."""
    sweep(state_dir)
    linux, lwk = set(linux_cpus), set(lwk_cpus)
    for found in status(state_dir):
        if (found.complete and set(found.linux_cpus) == linux and lwk <= set(found.lwk_cpus)
                and (idle_only or found.scope == "full")):
            return found
    return None


# --- one job ---------------------------------------------------------------------------------


@dataclass
class JobIsolation:
    """The isolation of one job's node, owned by its local rank 0."""

    applied: Isolation
    guard: subprocess.Popen | None  # None: an isolation this job found applied, not its own

    def finish(self, tracer: Tracer) -> None:
        """Restore now (the guard finds nothing left when this rank exits) and record what
        was applied in the run file's kernel group."""
        tracer.attrs("kernel", isolation=self.applied.describe())
        if self.guard is None:
            return
        summary = restore(self.applied.name, state_dir=self.applied.state_file.parent)
        if not summary.ok:
            print(f"mckmpi: warning: {summary.describe()}", file=sys.stderr, flush=True)


def require_isolatable(plan: NodePlan) -> None:
    """`--isolate` needs LWK cores to quiet: a usage error otherwise (found before MPI)."""
    if plan.mode != "lwk" or not plan.lwk_cpus:
        raise UsageError("--isolate quiets LWK cores: use it with --mode lwk and at least one "
                         "LWK core")


def isolate_job(enabled: bool, plan: NodePlan, node_comm: Any,
                cpuset: str | None = None) -> JobIsolation | None:
    """`mckmpi run --isolate`, collective over a node's ranks: its local rank 0 quiets the
    node's LWK cores before any app starts, or every rank raises the same error."""
    if not enabled:
        return None
    require_isolatable(plan)
    job, error = None, None
    if node_comm.Get_rank() == 0:
        try:
            job = _isolate_node(plan, cpuset)
        except UsageError as exc:
            error = str(exc)
    error = node_comm.bcast(error, root=0)
    if error:
        raise UsageError(error)
    return job


def _isolate_node(plan: NodePlan, cpuset: str | None) -> JobIsolation:
    from mckmpi.node import cpuset as cpusets

    state_dir = cpusets.default_state_dir()
    groups = None
    if cpuset:
        r = cpusets.load(cpuset)
        groups = (r.hierarchy.version, r.hierarchy.mount, r.parent / r.name, r.path("lwk"))
    held = covering(state_dir, plan.linux_cpus, plan.lwk_cpus)
    if held is not None:
        return JobIsolation(held, None)  # a reservation's or another job's: nothing to add
    name = f"run-{os.getpid()}"
    applied = apply(name, plan.linux_cpus, plan.lwk_cpus, state_dir=state_dir, cpusets=groups,
                    owner=os.getpid())
    watcher = guard(name, state_dir, os.getpid())
    os.sched_setaffinity(watcher.pid, plan.linux_cpus)
    return JobIsolation(applied, watcher)


# --- what needs a reboot -------------------------------------------------------------------


@dataclass(frozen=True)
class BootParam:
    name: str
    wanted: str  # the parameter to add, e.g. "nohz_full=1"
    current: str  # what the command line says now ("" = absent)
    what: str

    @property
    def ok(self) -> bool:
        return self.current == self.wanted.split("=", 1)[1]


def boot_advice(linux_cpus: Iterable[int], lwk_cpus: Iterable[int],
                cmdline: str | None = None) -> list[BootParam]:
    """The kernel parameters that would take the LWK cores further from Linux than any run-time
    setting can, with what the running kernel was booted with."""
    if cmdline is None:
        cmdline = Path("/proc/cmdline").read_text()
    given: dict[str, str] = {}
    for word in cmdline.split():
        if word == "--":
            break
        key, _, value = word.partition("=")
        given[key] = value
    lwk, linux = format_cpulist(lwk_cpus), format_cpulist(linux_cpus)
    wanted = [
        ("nohz_full", lwk, "no timer tick on a core running one task"),
        ("rcu_nocbs", lwk, "RCU callbacks run on the Linux cores"),
        ("isolcpus", f"managed_irq,domain,{lwk}",
         "no load balancing and no managed IRQs on the LWK cores from boot"),
        ("irqaffinity", linux, "device IRQs start on the Linux cores"),
    ]
    return [BootParam(n, f"{n}={v}", given.get(n, ""), w) for n, v, w in wanted]


def describe_boot(params: list[BootParam]) -> str:
    """One line: the parameters to add to the kernel command line, or that none are missing."""
    missing = [p for p in params if not p.ok]
    if not missing:
        return "the kernel command line isolates the LWK cores (" + " ".join(
            p.wanted for p in params) + ")"
    return ("needs a reboot with " + " ".join(p.wanted for p in missing) + " on the kernel command "
            "line (" + "; ".join(f"{p.name}: {p.what}" + (f", now {p.name}={p.current}" if p.current
                                                          else "") for p in missing) + ")")


def facts(linux_cpus: Iterable[int], lwk_cpus: Iterable[int], paths: Paths = Paths(),
          state_dir: Path | None = None) -> dict[str, str]:
    """What `mckmpi info` says about isolating `lwk_cpus` on this host: the boot parameters
    (present or to add), what the kernel isolates now, which run-time settings exist."""
    from mckmpi.node.kernelnoise import osnoise_status

    params = boot_advice(linux_cpus, lwk_cpus)
    out = {f"boot {p.name}": (p.current or "absent") + ("" if p.ok else f" (add {p.wanted})")
           for p in params}
    out["boot advice"] = describe_boot(params)
    for name in ("isolated", "nohz_full"):
        f = paths.cpu / name
        out[f"kernel {name} cpus"] = (f.read_text().strip() or "none") if f.exists() else "not offered"
    if not (paths.cpu / "nohz_full").exists():
        out["boot nohz_full"] += ("; this kernel is built without CONFIG_NO_HZ_FULL, so nohz_full "
                                  "needs another kernel too")
    qos = paths.cpu / "cpu0" / "power" / "pm_qos_resume_latency_us"
    out["run time: irq affinity"] = "settable (root)" if os.geteuid() == 0 else "needs root"
    out["run time: workqueue cpumask"] = (paths.workqueue.read_text().strip()
                                          if paths.workqueue.exists() else "not offered")
    out["run time: per-CPU PM QoS"] = "offered" if qos.exists() else "not offered"
    out["run time: /dev/cpu_dma_latency"] = ("offered (the idle policy's fallback)"
                                             if paths.dma_latency.exists() else "not offered")
    out["osnoise tracer"] = osnoise_status()
    if state_dir is not None and state_dir.is_dir():
        active = status(state_dir)
        out["applied now"] = "; ".join(i.name for i in active) or "none"
    return out


# --- state file ----------------------------------------------------------------------------


def locked(state_dir: Path) -> Iterator[None]:
    """One isolation change at a time per state directory."""
    return statefile.locked(state_dir, f"{SUFFIX}.lock")


def _load(path: Path) -> dict | None:
    return statefile.load(path, "isolation", _FORMAT,
                          "remove it by hand after checking the settings it names")


def _isolation(path: Path, data: dict) -> Isolation:
    return Isolation(data["name"], path, parse_cpulist(data["linux_cpus"]),
                     parse_cpulist(data["lwk_cpus"]), data.get("owner"), data["complete"],
                     [e["what"] for e in data["files"]]
                     + [f"kernel thread {t['comm']}" for t in data["threads"]]
                     + [h["what"] for h in data.get("holders", [])],
                     [tuple(r) for r in data["refused"]], data.get("scope", "full"))
