"""Who sends inter-processor interrupts to a job's cores, and why (root, tracefs).

/proc/interrupts counts the IPIs a core received (RES, CAL, TLB) but not who sent them. The
kernel's trace events do: ``ipi:ipi_send_cpu`` and ``ipi:ipi_send_cpumask`` fire in the
sending task with the target CPU(s) and the call site (``wakeup_preempt``: a wake-up that
preempts; ``on_each_cpu_cond_mask``: a function call such as a TLB flush), and
``csd:csd_queue_cpu`` names the function a function-call IPI will run (``flush_tlb_func``,
``do_sync_core``, ...). A private tracefs instance (``instances/mckmpi-PID``) records only
events aimed at the job's CPUs, from `start` to `stop`; nothing of the global tracer changes.
If tracefs is not mounted at its usual place, this process mounts it privately
(/run/mckmpi/tracefs-PID) for the window and unmounts it after, so the host's mounts stay as
they were; a mount or instance left by a killed job (its PID is gone) is removed by the next
start.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mckmpi.utility.units import format_cpulist, parse_cpulist

TRACEFS = Path("/sys/kernel/tracing")
PREFIX = "mckmpi-"
#: Per-CPU ring buffer of the instance (KiB): ~100k events per CPU before the oldest go.
BUFFER_KB = 4096

IPI_DTYPE = np.dtype([
    ("window", "S8"),          # app | measured (see kernelnoise.WINDOWS)
    ("cpu", "i4"),             # the target
    ("event", "S16"),          # ipi_send_cpu | ipi_send_cpumask | csd_queue_cpu
    ("sender", "S16"),         # comm of the sending thread
    ("tid", "i4"),             # sending thread (0: an interrupt on an idle CPU)
    ("owner", "S8"),           # job | other
    ("callsite", "S40"),       # the kernel function that sent it
    ("function", "S48"),       # what the target runs (callback / csd func); "" for a reschedule
    ("count", "i8"),
])

_LINE = re.compile(r"^\s*(?P<comm>.*?)-(?P<tid>\d+)\s+\[\d+\]\s+\S+\s+(?P<t>[\d.]+): "
                   r"(?P<event>ipi_send_cpu|ipi_send_cpumask|csd_queue_cpu): (?P<rest>.*)$")
_FIELD = re.compile(r"(\w+)=(\S+)")


def _symbol(text: str) -> str:
    """``flush_tlb_func+0x0/0x1a0`` -> ``flush_tlb_func``; a null pointer -> ""."""
    name = text.split("+", 1)[0]
    return "" if name in ("0x0", "(null)", "0") else name


def parse_trace(text: str, cpus: Iterable[int]) -> list[tuple[int, tuple]]:
    """(time in ns of the trace clock, (target cpu, event, sender, tid, callsite, function))
    for every event of a trace file aimed at one of `cpus`."""
    wanted = set(cpus)
    events = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if m is None:
            continue
        fields = dict(_FIELD.findall(m["rest"]))
        if m["event"] == "ipi_send_cpumask":
            targets = set(parse_cpulist(fields.get("cpumask", ""))) & wanted
        else:
            targets = {int(fields["cpu"])} & wanted if "cpu" in fields else set()
        function = _symbol(fields.get("func") or fields.get("callback", ""))
        sec, _, frac = m["t"].partition(".")
        t = int(sec) * 1_000_000_000 + int((frac + "000000000")[:9])
        for cpu in sorted(targets):
            events.append((t, (cpu, m["event"], m["comm"].strip(), int(m["tid"]),
                               _symbol(fields.get("callsite", "")), function)))
    return events


def rows(events: list[tuple[int, tuple]], job_tids: set[int],
         windows: dict[str, tuple[int, int]]) -> np.ndarray:
    """`IPI_DTYPE` rows per window (name -> [start, end) in ns of CLOCK_MONOTONIC), most
    frequent first per CPU."""
    out = []
    for name, (t0, t1) in windows.items():
        counts = Counter(key for t, key in events if t0 <= t < t1)
        out += [(name.encode(), cpu, ev.encode(), comm.encode(errors="replace")[:16], tid,
                 b"job" if tid in job_tids else b"other", site.encode()[:40], fn.encode()[:48], n)
                for (cpu, ev, comm, tid, site, fn), n in counts.items()]
    out.sort(key=lambda r: (r[0], r[1], -r[8]))
    return np.array(out, dtype=IPI_DTYPE)


@dataclass
class IpiTrace:
    """A tracefs instance counting IPIs aimed at `cpus`."""

    cpus: tuple[int, ...]
    root: Path = TRACEFS
    private: Path = Path("/run/mckmpi")  # where a private mount goes when `root` has none
    reason: str = ""  # why nothing is traced ("" while tracing)
    mounted: bool = False
    instance: Path | None = None
    dropped: int = 0
    _events: list = field(default_factory=list)

    def start(self) -> None:
        """Create the instance and enable the events; on any refusal keep the reason."""
        if os.geteuid() != 0:
            self.reason = "tracing IPIs needs root (tracefs)"
            return
        try:
            _remove_stale_mounts(self.private)
            if not (self.root / "instances").is_dir():
                self.root = self.private / f"tracefs-{os.getpid()}"
                self.root.mkdir(parents=True, exist_ok=True)
                subprocess.run(["mount", "-t", "tracefs", "nodev", str(self.root)], check=True,
                               capture_output=True, timeout=10)
                self.mounted = True
            _remove_stale(self.root)
            if not (self.root / "events" / "ipi" / "ipi_send_cpu").is_dir():
                raise OSError(0, "the kernel has no ipi trace events")
            self.instance = self.root / "instances" / f"{PREFIX}{os.getpid()}"
            self.instance.mkdir()
            (self.instance / "buffer_size_kb").write_text(str(BUFFER_KB))
            (self.instance / "trace_clock").write_text("mono")  # CLOCK_MONOTONIC, as the snapshots
            single = " || ".join(f"cpu == {c}" for c in self.cpus)
            mask = f"cpumask & CPUS{{{format_cpulist(self.cpus)}}}"
            for event, flt in (("ipi/ipi_send_cpu", single), ("ipi/ipi_send_cpumask", mask),
                               ("csd/csd_queue_cpu", single)):
                directory = self.instance / "events" / event
                if directory.is_dir():
                    (directory / "filter").write_text(flt)
                    (directory / "enable").write_text("1")
        except (OSError, subprocess.SubprocessError) as exc:
            self.reason = f"IPI tracing unavailable: {getattr(exc, 'strerror', None) or exc}"
            self.close()

    def stop(self) -> None:
        """Disable the events and count what they recorded."""
        if self.instance is None:
            return
        try:
            for event in ("ipi", "csd"):
                f = self.instance / "events" / event / "enable"
                if f.exists():
                    f.write_text("0")
            self._events = parse_trace((self.instance / "trace").read_text(), self.cpus)
            for stats in (self.instance / "per_cpu").glob("cpu*/stats"):
                for line in stats.read_text().splitlines():
                    if line.startswith("overrun:"):
                        self.dropped += int(line.split()[1])
        except OSError as exc:  # someone removed the instance or unmounted tracefs meanwhile
            self.reason = f"IPI trace lost: {exc}"
        finally:
            self.close()

    def rows(self, job_tids: set[int], windows: dict[str, tuple[int, int]]) -> np.ndarray:
        return rows(self._events, job_tids, windows)

    def close(self) -> None:
        """Remove the instance, and the private mount if this process made one."""
        try:
            if self.instance is not None and self.instance.exists():
                self.instance.rmdir()
        except OSError:
            pass  # gone already
        self.instance = None
        if self.mounted:
            _unmount(self.root)
        self.mounted = False


def _remove_stale(root: Path) -> None:
    """Instances of mckmpi processes that no longer exist (killed jobs)."""
    for inst in (root / "instances").glob(f"{PREFIX}*"):
        pid = inst.name[len(PREFIX):]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            inst.rmdir()


def _unmount(where: Path) -> None:
    subprocess.run(["umount", str(where)], check=False, capture_output=True, timeout=10)
    try:
        where.rmdir()
    except OSError:
        pass  # still mounted (busy) or gone: the next start retries


def _remove_stale_mounts(private: Path) -> None:
    """Private tracefs mounts of mckmpi processes that no longer exist (killed jobs)."""
    for where in private.glob("tracefs-*"):
        pid = where.name.removeprefix("tracefs-")
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            _unmount(where)
