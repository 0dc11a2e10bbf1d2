"""Booting the LWK side of a rank (`--mode lwk`): arena, Python noise control, scheduler.

The order follows what each step disturbs: the arena is created and pre-faulted first (the
last page faults the rank takes), then the GC is collected and frozen, the switch interval
raised and the scheduling policy chosen; the scheduler costs nothing until used. Counters
of the main thread (page faults, context switches) start after boot, so they describe the
app alone.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field, fields
from typing import Any

from mckmpi.lwk.arena import Arena
from mckmpi.lwk import quiet as quiet_module
from mckmpi.lwk.quiet import QuietState
from mckmpi.lwk.scheduler import Scheduler
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


def _thread_usage() -> dict[str, int]:
    ru = resource.getrusage(resource.RUSAGE_THREAD)
    return {"minflt": ru.ru_minflt, "majflt": ru.ru_majflt,
            "voluntary_switches": ru.ru_nvcsw, "involuntary_switches": ru.ru_nivcsw}


@dataclass
class LwkRuntime:
    """What a booted LWK rank owns; `record` traces it, `finish` gives the defaults back."""

    arena: Arena
    quiet: QuietState
    scheduler: Scheduler
    boot_ns: int
    usage_at_start: dict[str, int] = field(default_factory=dict)

    def start_app(self) -> None:
        self.usage_at_start = _thread_usage()

    def record(self, tracer: Tracer) -> None:
        """Memory, scheduler and noise-control statistics of this rank into the trace."""
        usage = _thread_usage()
        for name, value in usage.items():
            tracer.scalar("memory" if "flt" in name else "scheduler", name,
                          value - self.usage_at_start.get(name, 0), units="count")
        for name, value in self.arena.stats().items():
            tracer.scalar("memory", name, value)
        for name, value in self.scheduler.stats().items():
            tracer.scalar("scheduler", name, value)
        for name, value in self.quiet.stats().items():
            tracer.scalar("scheduler", name, value)
        tracer.scalar("memory", "boot_ns", self.boot_ns, units="ns")

    def finish(self) -> None:
        """Give the interpreter its defaults back (before the run file is written). The arena
        stays mapped: arrays of the app may still be alive, and it ends with the process."""
        self.quiet.restore()


def boot(options: LwkOptions, plan: NodePlan, rank: RankPlan) -> LwkRuntime:
    """Create this rank's arena, quiet the interpreter and set up the scheduler."""
    t0 = time.monotonic_ns()
    arena = Arena(rank.mem, hugepages=options.hugepages, lock=options.memlock,
                  numa_node=rank.numa_node, fallback=options.mem_fallback)
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
    return LwkRuntime(arena=arena, quiet=quiet, scheduler=Scheduler(), boot_ns=time.monotonic_ns() - t0)

