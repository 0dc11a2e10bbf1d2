"""Booting the LWK side of a rank (`--mode lwk`): arena, Python noise control, scheduler.

The order follows what each step disturbs: the arena is created and pre-faulted first (the
last page faults the rank takes), then the GC is collected and frozen, the switch interval
raised and the scheduling policy chosen; the scheduler costs nothing until used. Counters
of the main thread (page faults, context switches) start after boot, so they describe the
app alone.

The counters are sampled while the app runs (`LwkRuntime.snapshot`, called by the trace
streamer before every flush, from its own thread), so a job killed mid-run keeps them as
of its last flush. The main thread's page faults and switches are read from its own
/proc/thread-self files, opened at boot (before the offload filter: reading them stays a
native pread of a descriptor the rank already holds), not with getrusage, which would
describe the calling thread.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field, fields
from typing import Any

from mckmpi.errors import FeatureUnavailable
from mckmpi.lwk.arena import Arena
from mckmpi.lwk import quiet as quiet_module
from mckmpi.lwk.quiet import QuietState
from mckmpi.lwk.scheduler import Scheduler
from mckmpi.node.host import meminfo, shmem_thp
from mckmpi.node.partition import NodePlan, RankPlan
from mckmpi.trace.tracer import Tracer

FIFO_PRIORITY = 1  # the lowest real-time priority: above every SCHED_OTHER thread, no higher


@dataclass(frozen=True)
class LwkOptions:
    """The LWK settings of a rank, typed; declared (defaults, help) in `mckmpi.config`."""

    hugepages: str        # auto | never | require
    memlock: str          # auto | never | require
    mem_fallback: str     # error | linux
    switch_interval: float  # seconds, sys.setswitchinterval while the app runs
    rank_policy: str      # other | fifo
    oversubscribe: bool   # asked for by the user: ranks may share cores

    @classmethod
    def of(cls, settings: Any) -> LwkOptions:
        """The LWK part of resolved `mckmpi run` settings."""
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})


@dataclass
class ThreadCounters:
    """Page faults and context switches of the thread that opened it, readable from any
    thread (the same numbers getrusage(RUSAGE_THREAD) gives that thread)."""

    stat_fd: int
    status_fd: int

    @classmethod
    def of_this_thread(cls) -> ThreadCounters:
        stat = os.open("/proc/thread-self/stat", os.O_RDONLY | os.O_CLOEXEC)
        try:
            status = os.open("/proc/thread-self/status", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            os.close(stat)
            raise
        return cls(stat, status)

    def read(self) -> dict[str, int]:
        # stat: "pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt ..."
        fields = os.pread(self.stat_fd, 4096, 0).rpartition(b")")[2].split()
        switches = {}
        for line in os.pread(self.status_fd, 8192, 0).splitlines():
            name, _, value = line.partition(b":")
            if name in (b"voluntary_ctxt_switches", b"nonvoluntary_ctxt_switches"):
                switches[name] = int(value)
        return {"minflt": int(fields[7]), "majflt": int(fields[9]),
                "voluntary_switches": switches[b"voluntary_ctxt_switches"],
                "involuntary_switches": switches[b"nonvoluntary_ctxt_switches"]}

    def close(self) -> None:
        for fd in (self.stat_fd, self.status_fd):
            os.close(fd)


@dataclass
class LwkRuntime:
    """What a booted LWK rank owns; `record` traces it, `finish` gives the defaults back."""

    arena: Arena
    quiet: QuietState
    scheduler: Scheduler
    boot_ns: int
    counters: ThreadCounters
    usage_at_start: dict[str, int] = field(default_factory=dict)
    _recorded: bool = False  # the app returned and `record` wrote the final values
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start_app(self) -> None:
        self.usage_at_start = self.counters.read()

    def snapshot(self, tracer: Tracer) -> None:
        """The counters as they are now (safe from any thread while the app runs; nothing
        after `record`). Cumulative counters are recorded again each time: the run file
        keeps the last sample, taken at memory/snapshot_ns and scheduler/snapshot_ns."""
        with self._lock:
            if not self._recorded:
                self._write(tracer)

    def record(self, tracer: Tracer) -> None:
        """Memory, scheduler and noise-control statistics of this rank at the app's end."""
        with self._lock:
            self._write(tracer)
            self._recorded = True

    def _write(self, tracer: Tracer) -> None:
        now = time.monotonic_ns()
        for name, value in self.counters.read().items():
            tracer.scalar("memory" if "flt" in name else "scheduler", name,
                          value - self.usage_at_start.get(name, 0), units="count")
        for name, value in self.arena.stats().items():
            tracer.scalar("memory", name, value)
        for name, value in self.scheduler.stats().items():
            tracer.scalar("scheduler", name, value)
        for name, value in self.quiet.stats().items():
            tracer.scalar("scheduler", name, value)
        tracer.scalar("memory", "boot_ns", self.boot_ns, units="ns")
        for group in ("memory", "scheduler"):
            tracer.scalar(group, "snapshot_ns", now, units="ns")

    def finish(self) -> None:
        """Give the interpreter its defaults back (before the run file is written). The arena
        stays mapped: arrays of the app may still be alive, and it ends with the process."""
        self.quiet.restore()
        self.counters.close()


def preflight(options: LwkOptions, plan: NodePlan) -> None:
    """Refuse, before the job starts (so it leaves no run file), what the arena's boot would
    refuse from the node's settings alone: huge pages required where the node has neither
    enough free hugetlb pages for a rank's arena nor shmem THP. What only the boot can find
    (MFD_HUGETLB or mlock failing, THP not given) is still refused there."""
    mem = max((r.mem for r in plan.ranks), default=0)
    if options.hugepages != "require" or mem <= 0:
        return
    info = meminfo()
    huge, pool = info.get("Hugepagesize", 0), info.get("HugePages_Free", 0)
    need = -(-mem // huge) if huge else 0
    thp_possible, thp_setting = shmem_thp()
    if not (huge and pool >= need) and not thp_possible:
        raise FeatureUnavailable(f"huge pages required but unavailable: no hugetlb pages "
                                 f"reserved (HugePages_Free={pool}, need {need}); shmem THP "
                                 f"disabled ({thp_setting})")


def boot(options: LwkOptions, plan: NodePlan, rank: RankPlan) -> LwkRuntime:
    """Create this rank's arena, quiet the interpreter and set up the scheduler."""
    t0 = time.monotonic_ns()
    counters = ThreadCounters.of_this_thread()  # the rank's main thread, read from any
    try:
        arena = Arena(rank.mem, hugepages=options.hugepages, lock=options.memlock,
                      numa_node=rank.numa_node, fallback=options.mem_fallback)
    except BaseException:
        counters.close()
        raise
    quiet = quiet_module.state  # the state `mckmpi.lwk.safepoint()` reports to
    quiet.freeze_gc()
    quiet.raise_switch_interval(options.switch_interval)
    if options.rank_policy == "fifo" and (plan.oversubscribed or options.oversubscribe):
        # Also when only asked for: nodes sharing a host (virtual or several slurmd) may put
        # their ranks on the same core, which one node's plan cannot see.
        quiet.policy_reason = "not requested: ranks may share cores (oversubscribe), FIFO would starve them"
    elif options.rank_policy == "fifo":
        quiet.set_fifo(FIFO_PRIORITY, plan.linux_cpus)
    else:
        quiet.policy_reason = "SCHED_OTHER requested"
    return LwkRuntime(arena=arena, quiet=quiet, scheduler=Scheduler(),
                      boot_ns=time.monotonic_ns() - t0, counters=counters)

