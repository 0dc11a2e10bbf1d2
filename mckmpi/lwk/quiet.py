"""Python's own noise sources, governed for measured phases of an LWK rank.

Besides the OS, the interpreter itself makes noise: the cyclic garbage collector pauses the
rank whenever allocation counters cross a threshold (up to milliseconds, at a point nobody
chose), the GIL hand-over interval interrupts the running thread when another thread wants the
GIL, and a SCHED_OTHER thread can be preempted by anything that becomes runnable on its core.
`QuietState` turns each of these into an explicit, recorded decision:

- the GC is collected once, frozen and disabled; it runs only at `safepoint()` calls chosen
  by the application, and once more at exit so finalizers (file flushes) still run;
- the switch interval is raised for the phase and restored afterwards (a larger interval
  also delays `WorkerPool` threads that wait for the GIL while the rank computes);
- SCHED_FIFO is taken only when it cannot starve Linux: the rank's affinity must exclude
  the Linux cores and the kernel's RT throttling must be on; otherwise the reason is kept.

GC state, switch interval and scheduling policy are process- (or thread-) wide, so one state
object per process is the norm: `state` and the module-level functions bound to it.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
import time
from typing import Iterable

from mckmpi.errors import UsageError

RT_RUNTIME_PATH = "/proc/sys/kernel/sched_rt_runtime_us"
RT_PERIOD_PATH = "/proc/sys/kernel/sched_rt_period_us"

_POLICY_NAMES = {
    os.SCHED_OTHER: "SCHED_OTHER",
    os.SCHED_FIFO: "SCHED_FIFO",
    os.SCHED_RR: "SCHED_RR",
    os.SCHED_BATCH: "SCHED_BATCH",
    os.SCHED_IDLE: "SCHED_IDLE",
}


def policy_name(policy: int) -> str:
    return _POLICY_NAMES.get(policy, f"policy {policy}")


def read_rt_us(path: str = RT_RUNTIME_PATH) -> int | None:
    """The kernel's RT throttling budget (-1 = unlimited) or, given RT_PERIOD_PATH, its
    period, in us; None if unreadable."""
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def fifo_refusal(affinity: Iterable[int], linux_cpus: Iterable[int],
                 rt_runtime_us: int | None) -> str | None:
    """Why SCHED_FIFO could starve Linux with these facts, or None when it cannot.

    A FIFO thread that spins never yields to SCHED_OTHER work on its core. That is what an
    LWK core wants, but the Linux cores must stay free for the proxy and the daemons, and
    RT throttling must remain as the last guard against a runaway rank.
    """
    linux = set(linux_cpus)
    aff = set(affinity)
    if not linux:
        return "no Linux cores given: cannot check that SCHED_FIFO leaves Linux a core"
    shared = sorted(aff & linux)
    if shared:
        return (f"affinity {sorted(aff)} includes Linux cores {shared}: SCHED_FIFO could "
                "starve them")
    if rt_runtime_us is None:
        return f"cannot read {RT_RUNTIME_PATH}: RT throttling unknown"
    if rt_runtime_us == -1:
        return ("RT throttling is off (sched_rt_runtime_us = -1): a spinning SCHED_FIFO rank "
                "could hang the node")
    return None


def _throttle_text() -> str:
    """How much of each RT period Linux takes back from a FIFO thread, in words."""
    runtime, period = read_rt_us(RT_RUNTIME_PATH), read_rt_us(RT_PERIOD_PATH)
    if runtime is None or period is None or runtime < 0:
        return "an unknown share of each period"
    return f"{(period - runtime) / 1000:g} ms of every {period / 1e6:g} s"


class QuietState:
    """Applies and records the interpreter-noise decisions; `restore()` undoes all of them."""

    def __init__(self) -> None:
        self.gc_was_enabled: bool | None = None
        self.gc_frozen = 0
        self.safepoints = 0
        self.safepoint_ns = 0
        self.safepoint_max_ns = 0
        self.safepoint_collected = 0
        self.collect_at_exit = False
        self.switch_interval_before = sys.getswitchinterval()
        self.switch_interval_after = self.switch_interval_before
        self._interval_changed = False
        self.policy = policy_name(os.sched_getscheduler(0))
        self.policy_reason = "not requested"
        self.fifo_priority = 0
        self._froze = False
        self._saved_policy: tuple[int, int] | None = None

    def __enter__(self) -> QuietState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def freeze_gc(self, at_exit: bool = True) -> int:
        """Collect, move every survivor out of the GC's reach and disable automatic runs.

        Returns the number of frozen objects. With `at_exit`, a last full collection runs at
        interpreter exit so objects waiting for the GC are still finalized.
        """
        if self.gc_was_enabled is None:
            self.gc_was_enabled = gc.isenabled()
        gc.disable()
        gc.collect()
        gc.freeze()
        self._froze = True
        self.gc_frozen = gc.get_freeze_count()
        if at_exit and not self.collect_at_exit:
            atexit.register(self._exit_collection)
            self.collect_at_exit = True
        return self.gc_frozen

    def safepoint(self, full: bool = False) -> int:
        """Collect now, at a point the application chose, then freeze again; returns ns spent.

        A plain safepoint reclaims what was allocated since the last freeze; `full` also
        reclaims garbage among previously frozen objects (a longer pause).
        """
        t0 = time.perf_counter_ns()
        if full:
            gc.unfreeze()
        self.safepoint_collected += gc.collect()
        gc.freeze()
        spent = time.perf_counter_ns() - t0
        self._froze = True
        self.gc_frozen = gc.get_freeze_count()
        self.safepoints += 1
        self.safepoint_ns += spent
        self.safepoint_max_ns = max(self.safepoint_max_ns, spent)
        return spent

    def raise_switch_interval(self, seconds: float) -> None:
        """Set the GIL switch interval for the measured phase (restored by `restore`)."""
        if not seconds > 0:
            raise UsageError(f"switch interval must be positive, got {seconds}")
        if not self._interval_changed:
            self.switch_interval_before = sys.getswitchinterval()
            self._interval_changed = True
        sys.setswitchinterval(seconds)
        self.switch_interval_after = sys.getswitchinterval()

    def set_fifo(self, priority: int, linux_cpus: Iterable[int]) -> tuple[str, str]:
        """Run the calling thread SCHED_FIFO at `priority` when that cannot starve Linux.

        Returns (policy in effect, reason); a refused or failed request leaves the policy as
        it was (SCHED_OTHER normally) and says why.
        """
        lo, hi = os.sched_get_priority_min(os.SCHED_FIFO), os.sched_get_priority_max(os.SCHED_FIFO)
        if not lo <= priority <= hi:
            raise UsageError(f"SCHED_FIFO priority must be in [{lo}, {hi}], got {priority}")
        affinity = os.sched_getaffinity(0)
        linux = sorted(set(linux_cpus))
        reason = fifo_refusal(affinity, linux, read_rt_us())
        if reason is None:
            current = os.sched_getscheduler(0)
            if self._saved_policy is None:
                self._saved_policy = (current, os.sched_getparam(0).sched_priority)
            try:
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
            except OSError as exc:
                reason = (f"sched_setscheduler(SCHED_FIFO, {priority}) failed: {exc.strerror} "
                          "(needs CAP_SYS_NICE or RLIMIT_RTPRIO, and RT runtime in the cgroup)")
            else:
                self.fifo_priority = priority
                reason = (f"priority {priority} on CPUs {sorted(affinity)}, Linux cores "
                          f"{linux} left to Linux; RT throttling lends the core to waiting "
                          f"tasks for {_throttle_text()}")
        self.policy = policy_name(os.sched_getscheduler(0))
        self.policy_reason = reason
        return self.policy, reason

    def stats(self) -> dict[str, int | float | str | bool]:
        """Everything decided and measured, as plain scalars (for a trace's attributes)."""
        return {
            "gc_enabled": gc.isenabled(),
            "gc_frozen": self.gc_frozen,
            "gc_collect_at_exit": self.collect_at_exit,
            "safepoints": self.safepoints,
            "safepoint_ns": self.safepoint_ns,
            "safepoint_max_ns": self.safepoint_max_ns,
            "safepoint_collected": self.safepoint_collected,
            "switch_interval_before": self.switch_interval_before,
            "switch_interval_after": self.switch_interval_after,
            "policy": self.policy,
            "policy_reason": self.policy_reason,
            "fifo_priority": self.fifo_priority,
        }

    def restore(self) -> None:
        """Give back Python's default behaviour: policy, switch interval, live GC."""
        if self._saved_policy is not None:
            policy, prio = self._saved_policy
            os.sched_setscheduler(0, policy, os.sched_param(prio))
            self._saved_policy = None
            self.policy = policy_name(policy)
            self.policy_reason = "restored"
            self.fifo_priority = 0
        if self._interval_changed:
            sys.setswitchinterval(self.switch_interval_before)
            self.switch_interval_after = self.switch_interval_before
            self._interval_changed = False
        if self._froze:
            gc.unfreeze()
            self._froze = False
            self.gc_frozen = 0
        if self.gc_was_enabled:
            gc.enable()
        self.gc_was_enabled = None
        if self.collect_at_exit:
            atexit.unregister(self._exit_collection)
            self.collect_at_exit = False

    def _exit_collection(self) -> None:
        gc.unfreeze()
        gc.enable()
        gc.collect()


#: The process's state: the GC and the switch interval are process-wide.
state = QuietState()
freeze_gc = state.freeze_gc
safepoint = state.safepoint
raise_switch_interval = state.raise_switch_interval
set_fifo = state.set_fifo
