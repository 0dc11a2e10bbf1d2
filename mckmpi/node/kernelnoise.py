"""What the kernel did on a job's cores while it ran: interrupts, softirqs, CPU time, other tasks.

McKernel's LWK cores see no device interrupts, no timer ticks and no other address space's
IPIs; a Linux core under a cpuset still sees all of them. This module counts them, per CPU of
the node, between two snapshots taken around the app (`start` after the LWK boot, `stop`
before the run file is written), so a run file says where every remaining microsecond of
noise comes from:

- ``/proc/interrupts``: every device IRQ line and every per-CPU architecture line (LOC local
  timer, RES rescheduling, CAL function call, TLB shootdown, IWI irq work, ...);
- ``/proc/softirqs``: TIMER, NET_RX, SCHED, RCU, ...;
- ``/proc/stat``: per-CPU time in user, system, irq, softirq, idle and steal (the hypervisor's);
- context switches per CPU, counted by a CPU-wide perf software counter (root or
  perf_event_paranoid <= 0; otherwise recorded as unknown with the reason);
- the other tasks that ran there: every thread's run time (``/proc/*/task/*/schedstat``)
  sampled at both ends and attributed to the CPU it last ran on (field 39 of its ``stat``). For
  a per-CPU kernel thread (kworker/N, ksoftirqd/N) that is exact; a task that moved away
  during the window is attributed to where it ended.

The node's local rank 0 records the node's CPUs (the other ranks record no rows), as the
tables ``kernel/interrupts``, ``kernel/cpus`` and ``kernel/tasks``. Parsing is pure (text in,
numbers out) so it is tested on fixed texts; only `snapshot` reads /proc.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mckmpi import linux
from mckmpi.node.ipitrace import IpiTrace
from mckmpi.node.partition import NodePlan
from mckmpi.trace.tracer import Tracer

GROUP = "kernel"

#: The two windows: the whole app, and its measured phases (first begin to last end of
#: `appkit.run_phases`), the steady state a noise benchmark samples.
WINDOWS = ("app", "measured")

INTERRUPT_DTYPE = np.dtype([
    ("window", "S8"),
    ("cpu", "i4"),
    ("kind", "S8"),            # device | arch | softirq
    ("source", "S16"),         # IRQ number, LOC/RES/CAL/..., or the softirq's name
    ("description", "S48"),    # the device's action names, or the kernel's text for the line
    ("count", "i8"),
])

CPU_DTYPE = np.dtype([
    ("window", "S8"),
    ("cpu", "i4"),
    ("side", "S8"),            # linux | lwk: the node plan's side of the CPU
    ("ranks", "i4"),           # ranks of this node that run there
    ("window_ns", "i8"),
    ("user_ns", "i8"), ("system_ns", "i8"), ("idle_ns", "i8"), ("iowait_ns", "i8"),
    ("irq_ns", "i8"), ("softirq_ns", "i8"), ("steal_ns", "i8"),
    ("switches", "i8"),        # context switches on the CPU; -1 when not counted (measured window)
    ("interrupts", "i8"),      # sum of the CPU's rows in kernel/interrupts except softirqs
])

TASK_DTYPE = np.dtype([
    ("cpu", "i4"),             # where the task last ran at the end of the window
    ("pid", "i4"),
    ("tid", "i4"),
    ("comm", "S16"),
    ("owner", "S8"),           # job (a rank, its children, the node proxy) | other
    ("run_ns", "i8"),
    ("wait_ns", "i8"),         # time runnable but waiting for a CPU
    ("slices", "i8"),          # times it was put on a CPU
])

_UNITS_CPU = {f: "ns" for f in CPU_DTYPE.names if f.endswith("_ns")}
_UNITS_TASK = {"run_ns": "ns", "wait_ns": "ns"}

#: /proc/stat per-CPU columns, in order.
STAT_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
_TICK_NS = 1_000_000_000 // os.sysconf("SC_CLK_TCK")

# perf_event_attr (the 64-byte first version): type, size, config, sample_period, sample_type,
# read_format, flag bits, wakeup_events, bp_type, config1.
_PERF_TYPE_SOFTWARE, _PERF_COUNT_SW_CONTEXT_SWITCHES, _PERF_FLAG_FD_CLOEXEC = 1, 3, 8
_SWITCH_ATTR = struct.pack("IIQQQQQIIQ", _PERF_TYPE_SOFTWARE, 64, _PERF_COUNT_SW_CONTEXT_SWITCHES,
                           0, 0, 0, 0, 0, 0, 0)


# --- parsing (pure) ------------------------------------------------------------------------


@dataclass(frozen=True)
class Line:
    """One line of /proc/interrupts or /proc/softirqs."""

    kind: str
    source: str
    description: str
    counts: dict[int, int]  # CPU -> count


def _columns(header: str) -> list[int]:
    return [int(word[3:]) for word in header.split() if word.startswith("CPU")]


def _per_cpu_rows(text: str) -> Iterator[tuple[str, dict[int, int], list[str]]]:
    """(name, count per CPU, the words after the counts) of each `NAME: n n ... text` row of
    a /proc table whose header names the CPU columns; rows without a count per CPU are
    left out: they cannot be attributed to a CPU."""
    rows = text.splitlines()
    if not rows:
        return
    cpus = _columns(rows[0])
    for row in rows[1:]:
        name, sep, rest = row.partition(":")
        words = rest.split()
        if sep and len(words) >= len(cpus) and all(w.isdigit() for w in words[:len(cpus)]):
            yield name.strip(), dict(zip(cpus, map(int, words))), words[len(cpus):]


def parse_interrupts(text: str) -> list[Line]:
    """/proc/interrupts: numbered lines are device IRQs, named ones per-CPU architecture
    counters (LOC, RES, CAL, TLB, ...). Lines with one total instead of per-CPU counts (ERR,
    MIS) are left out."""
    lines = []
    for name, counts, tail in _per_cpu_rows(text):
        if name.isdigit():
            # chip, hardware IRQ and trigger, then the actions (device names)
            description = " ".join(tail[2:]) if len(tail) > 2 else " ".join(tail)
            lines.append(Line("device", name, description, counts))
        else:
            lines.append(Line("arch", name, " ".join(tail), counts))
    return lines


def parse_softirqs(text: str) -> list[Line]:
    """/proc/softirqs: one line per softirq vector."""
    return [Line("softirq", name, "", counts) for name, counts, _ in _per_cpu_rows(text)]


def parse_stat(text: str) -> dict[int, dict[str, int]]:
    """Per-CPU times of /proc/stat, in nanoseconds (the kernel counts USER_HZ ticks)."""
    out = {}
    for row in text.splitlines():
        words = row.split()
        if words and words[0].startswith("cpu") and words[0][3:].isdigit():
            values = [int(w) for w in words[1:1 + len(STAT_FIELDS)]]
            values += [0] * (len(STAT_FIELDS) - len(values))
            out[int(words[0][3:])] = {f: v * _TICK_NS for f, v in zip(STAT_FIELDS, values)}
    return out


@dataclass(frozen=True)
class TaskSample:
    pid: int
    tid: int
    ppid: int
    comm: str
    cpu: int
    run_ns: int
    wait_ns: int
    slices: int


def parse_task(pid: int, tid: int, stat: str, schedstat: str) -> TaskSample:
    """One thread from its ``stat`` and ``schedstat`` files (comm may hold spaces and ')')."""
    comm = stat[stat.index("(") + 1:stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2:].split()
    run_ns, wait_ns, slices = (int(x) for x in schedstat.split()[:3])
    # after the comm: state(3) ppid(4) ... processor(39)
    return TaskSample(pid, tid, int(fields[1]), comm, int(fields[36]), run_ns, wait_ns, slices)


# --- snapshots -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """The kernel's counters at one instant."""

    t_ns: int
    lines: list[Line]
    stat: dict[int, dict[str, int]]
    tasks: dict[int, TaskSample]


def read_tasks(proc: Path = Path("/proc")) -> dict[int, TaskSample]:
    """Every thread of the machine (those that end while being read are skipped)."""
    tasks = {}
    for pid_dir in proc.iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            tids = [t for t in os.listdir(pid_dir / "task") if t.isdigit()]
        except OSError:
            continue
        for tid in tids:
            base = pid_dir / "task" / tid
            try:
                sample = parse_task(int(pid_dir.name), int(tid), (base / "stat").read_text(),
                                    (base / "schedstat").read_text())
            except (OSError, ValueError, IndexError):
                continue
            tasks[sample.tid] = sample
    return tasks


class ProcFiles:
    """/proc/interrupts, /proc/softirqs and /proc/stat, opened once: a snapshot then reads
    them from offset 0 without an open(2). Under the offload's seccomp filter every path call
    makes a round trip to the proxy (which wakes this thread with an IPI); reads of a
    descriptor opened beforehand stay native and quiet."""

    NAMES = ("interrupts", "softirqs", "stat")

    def __init__(self, proc: Path = Path("/proc")) -> None:
        self.fds = {name: os.open(proc / name, os.O_RDONLY | os.O_CLOEXEC) for name in self.NAMES}

    def read(self, name: str) -> str:
        fd = self.fds[name]
        os.lseek(fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks).decode()

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}


def snapshot(proc: Path = Path("/proc"), tasks: bool = True, files: ProcFiles | None = None) -> Snapshot:
    """Read every counter once; `tasks=False` skips the thread walk (the costly part);
    `files` reads through descriptors opened beforehand."""
    def read(name: str) -> str:
        return files.read(name) if files is not None else (proc / name).read_text()

    lines = parse_interrupts(read("interrupts")) + parse_softirqs(read("softirqs"))
    stat = parse_stat(read("stat"))
    return Snapshot(time.monotonic_ns(), lines, stat, read_tasks(proc) if tasks else {})


def interrupt_deltas(before: Snapshot, after: Snapshot, cpus: Iterable[int],
                     window: str = "app") -> np.ndarray:
    """Rows of `INTERRUPT_DTYPE`: every line that counted on one of `cpus` in between."""
    old = {(ln.kind, ln.source): ln for ln in before.lines}
    rows = []
    for ln in after.lines:
        prev = old.get((ln.kind, ln.source))
        for cpu in cpus:
            # a line that appeared in between (a device's IRQ was set up) started at 0
            d = ln.counts.get(cpu, 0) - (prev.counts.get(cpu, 0) if prev else 0)
            if d > 0:
                rows.append((window.encode(), cpu, ln.kind.encode(), ln.source.encode()[:16],
                             ln.description.encode(errors="replace")[:48], d))
    return np.array(rows, dtype=INTERRUPT_DTYPE)


def task_deltas(before: Snapshot, after: Snapshot, cpus: Iterable[int],
                job_pids: Iterable[int]) -> np.ndarray:
    """Rows of `TASK_DTYPE`: threads that ran in between and ended on one of `cpus`."""
    wanted, job = set(cpus), set(job_pids)
    rows = []
    for tid, t in after.tasks.items():
        prev = before.tasks.get(tid)
        if prev is not None and prev.pid != t.pid:
            prev = None  # a reused thread id
        run = t.run_ns - (prev.run_ns if prev else 0)
        if t.cpu not in wanted or run <= 0:
            continue
        owner = "job" if t.pid in job or t.ppid in job else "other"
        rows.append((t.cpu, t.pid, t.tid, t.comm.encode(errors="replace")[:16], owner.encode(), run,
                     t.wait_ns - (prev.wait_ns if prev else 0), t.slices - (prev.slices if prev else 0)))
    rows.sort(key=lambda r: (r[0], -r[5]))
    return np.array(rows, dtype=TASK_DTYPE)


def cpu_rows(before: Snapshot, after: Snapshot, sides: Mapping[int, tuple[str, int]],
             switches: Mapping[int, int], interrupts: np.ndarray, window: str = "app") -> np.ndarray:
    """Rows of `CPU_DTYPE`, one per CPU of `sides` (cpu -> (side, ranks there))."""
    rows = np.zeros(len(sides), dtype=CPU_DTYPE)
    for i, (cpu, (side, ranks)) in enumerate(sorted(sides.items())):
        a, b = before.stat.get(cpu, {}), after.stat.get(cpu, {})
        r = rows[i]
        r["window"], r["cpu"], r["side"], r["ranks"] = window.encode(), cpu, side.encode(), ranks
        r["window_ns"] = after.t_ns - before.t_ns
        for f in ("user", "system", "idle", "iowait", "irq", "softirq", "steal"):
            r[f"{f}_ns"] = b.get(f, 0) - a.get(f, 0)
        r["user_ns"] += b.get("nice", 0) - a.get("nice", 0)
        r["switches"] = switches.get(cpu, -1)
        mine = interrupts[(interrupts["cpu"] == cpu) & (interrupts["kind"] != b"softirq")]
        r["interrupts"] = int(mine["count"].sum())
    return rows


# --- context switches ----------------------------------------------------------------------


class SwitchCounters:
    """CPU-wide perf counters of context switches. Opening one costs a function-call IPI on its
    CPU, reading one another: both happen outside the interrupt snapshots' window."""

    def __init__(self, cpus: Iterable[int]) -> None:
        self.fds: dict[int, int] = {}
        self.reason = ""
        for cpu in cpus:
            try:
                self.fds[cpu] = linux.perf_event_open(_SWITCH_ATTR, -1, cpu, -1, _PERF_FLAG_FD_CLOEXEC)
            except OSError as exc:
                self.close()
                self.reason = (f"no CPU-wide perf counter ({exc.strerror}; needs root or "
                               "kernel.perf_event_paranoid <= 0)")
                return

    def read(self) -> dict[int, int]:
        """Switches per CPU since opening; closes the counters."""
        counts = {cpu: struct.unpack("q", os.read(fd, 8))[0] for cpu, fd in self.fds.items()}
        self.close()
        return counts

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}


# --- the recorder --------------------------------------------------------------------------


@dataclass
class KernelNoise:
    """Counts one node's kernel activity over a window and records it through the tracer."""

    sides: dict[int, tuple[str, int]]  # cpu -> (side, ranks there)
    job_pids: set[int] = field(default_factory=set)
    proc: Path = Path("/proc")
    _switches: SwitchCounters | None = None
    _ipis: IpiTrace | None = None
    _before: Snapshot | None = None
    _begin: Snapshot | None = None
    _end: Snapshot | None = None
    _osnoise: str = ""
    _files: ProcFiles | None = None

    def start(self) -> None:
        self._ipis = IpiTrace(tuple(sorted(self.sides)))
        self._ipis.start()
        # where the IPI trace found (or mounted) tracefs, while it is mounted
        self._osnoise = osnoise_status([self._ipis.root]) if not self._ipis.reason else osnoise_status()
        self._switches = SwitchCounters(self.sides)
        self._files = ProcFiles(self.proc)
        self._before = snapshot(self.proc, files=self._files)

    def begin(self) -> None:
        """The app's measured phases begin (the first call counts): a cheap snapshot, no
        thread walk and no counter read, so marking costs the cores nothing."""
        if self._begin is None and self._files is not None:
            self._begin = snapshot(self.proc, tasks=False, files=self._files)

    def end(self) -> None:
        """The app's measured phases end (the last call counts)."""
        if self._begin is not None and self._files is not None:
            self._end = snapshot(self.proc, tasks=False, files=self._files)

    def stop(self, tracer: Tracer) -> None:
        """Take the closing snapshot and record the tables of both windows."""
        if self._before is None or self._switches is None or self._ipis is None:
            raise RuntimeError("KernelNoise.stop before start")
        after = snapshot(self.proc, files=self._files)
        if self._files is not None:
            self._files.close()
        switches = self._switches.read()
        self._ipis.stop()
        cpus = sorted(self.sides)
        windows = [("app", self._before, after, switches)]
        if self._begin is not None and self._end is not None:
            windows.append(("measured", self._begin, self._end, {}))
        interrupts, cpu_table = [], []
        for name, a, b, sw in windows:
            rows = interrupt_deltas(a, b, cpus, name)
            interrupts.append(rows)
            cpu_table.append(cpu_rows(a, b, self.sides, sw, rows, name))
        tracer.table(GROUP, "interrupts", np.concatenate(interrupts))
        tracer.table(GROUP, "cpus", np.concatenate(cpu_table), units=_UNITS_CPU)
        tracer.table(GROUP, "tasks", task_deltas(self._before, after, cpus, self.job_pids),
                     units=_UNITS_TASK)
        if not self._ipis.reason:
            job_tids = {t.tid for t in after.tasks.values()
                        if t.pid in self.job_pids or t.ppid in self.job_pids}
            spans = {name: (a.t_ns, b.t_ns) for name, a, b, _ in windows}
            tracer.table(GROUP, "ipis", self._ipis.rows(job_tids, spans))
        ipis = self._ipis.reason or (
            "traced (ipi:ipi_send_cpu, ipi:ipi_send_cpumask, csd:csd_queue_cpu), "
            f"{self._ipis.dropped} events lost to a full buffer")
        tracer.attrs(GROUP, ipis=ipis,
                     switches=self._switches.reason or "perf software counter per CPU (app window)",
                     tasks="run time sampled at both ends of the app window, on the CPU a thread "
                           "last ran on", osnoise=self._osnoise)


def plan_sides(plan: NodePlan) -> dict[int, tuple[str, int]]:
    """Every CPU of a node plan -> (its side, how many of the node's ranks run there)."""
    linux_side = set(plan.linux_cpus) if plan.mode == "lwk" else set(plan.cpus)
    return {cpu: ("linux" if cpu in linux_side else "lwk",
                  sum(cpu in r.cpus for r in plan.ranks)) for cpu in plan.cpus}


def start_on_node(plan: NodePlan, node_comm: Any) -> KernelNoise | None:
    """Collective over the node's ranks: the node's local rank 0 starts counting its CPUs
    (and returns the recorder); the others only tell it their process ids."""
    pids = node_comm.allgather(os.getpid())
    if node_comm.Get_rank() != 0:
        return None
    recorder = KernelNoise(plan_sides(plan), set(pids))
    recorder.start()
    return recorder


def osnoise_status(tracefs: Iterable[Path] = (Path("/sys/kernel/tracing"),
                                              Path("/sys/kernel/debug/tracing")),
                   kernel_configs: Iterable[Path] | None = None) -> str:
    """Whether the kernel's osnoise tracer could add its per-CPU summary, and why not: a
    kernel built without it is told from a tracefs that is only not mounted (the kernel's
    build configuration says which, where the kernel exposes it)."""
    for root in tracefs:
        tracers = root / "available_tracers"
        if tracers.exists():
            try:
                names = tracers.read_text().split()
            except OSError as exc:
                return f"unavailable: {tracers}: {exc.strerror}"
            if "osnoise" in names:
                return "available, not recorded: mckmpi does not run the tracer yet"
            return (f"unavailable: the kernel offers no osnoise tracer (CONFIG_OSNOISE_TRACER; "
                    f"{tracers}: {' '.join(names)})")
    built = kernel_option("CONFIG_OSNOISE_TRACER", kernel_configs)
    if built is not None and built[0] != "y":
        return (f"unavailable: the kernel is built without the osnoise tracer "
                f"(CONFIG_OSNOISE_TRACER is not set in {built[1]})")
    mount = "tracefs is not mounted (mount -t tracefs nodev /sys/kernel/tracing)"
    if built is None:
        return f"unavailable: {mount}; whether the kernel has the osnoise tracer is unknown"
    return f"unavailable: {mount}; the kernel has the osnoise tracer ({built[1]})"


def kernel_option(name: str, configs: Iterable[Path] | None = None) -> tuple[str, Path] | None:
    """The value of a kernel build option (``y``, ``m``, ``n`` when not set) and the file that
    says so (/proc/config.gz, /boot/config-RELEASE), or None where no such file is readable."""
    import gzip

    if configs is None:
        configs = (Path("/proc/config.gz"), Path("/boot") / f"config-{os.uname().release}")
    for path in configs:
        try:
            opener = gzip.open if path.suffix == ".gz" else open
            with opener(path, "rt", errors="replace") as fh:
                for line in fh:
                    if line.startswith(name + "="):
                        return line.split("=", 1)[1].strip(), path
            return "n", path
        except (OSError, EOFError):
            continue
    return None
