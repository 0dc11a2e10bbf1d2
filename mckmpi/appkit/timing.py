"""Clocks of the apps: CLOCK_MONOTONIC in int64 ns (the clock of the run file), the
timer's measured resolution agreed across ranks, and the smallest quantum it allows."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any

#: The clock of every app timestamp: CLOCK_MONOTONIC in int64 ns (as the run file).
clock = time.monotonic_ns
#: A time that never comes (an idle noise injector's next due time).
NEVER = 1 << 62
#: The smallest work quantum an app accepts, whatever the timer could resolve.
MIN_QUANTUM_NS = 10_000
#: ... and it must span this many steps of the clock.
QUANTUM_PER_STEP = 50



@dataclass(frozen=True)
class TimerStats:
    """What one reading of `clock` costs and the smallest step it can show."""

    cost_ns: int
    resolution_ns: int  # smallest step between two distinct reads (never below a read's cost)

    @property
    def min_quantum_ns(self) -> int:
        """The shortest interval worth timing: a sample is off by about one step of the clock
        (at least one read's cost), and 50 times that keeps the error within 2 %."""
        return max(MIN_QUANTUM_NS, QUANTUM_PER_STEP * max(self.cost_ns, self.resolution_ns))

    def check_quantum(self, p: argparse.ArgumentParser, option: str, value_us: float) -> int:
        """`value_us` in ns, or one clear line and exit 2 when it is below the resolution."""
        ns = round(value_us * 1000)
        if ns < self.min_quantum_ns:
            p.error(f"{option} {value_us:g} is below the benchmark's resolution: the shortest "
                    f"is {self.min_quantum_ns / 1000:g} us (a clock read costs {self.cost_ns} ns, "
                    f"its resolution is {self.resolution_ns} ns)")
        return ns


def measure_timer(reads: int = 20_000, trials: int = 5) -> TimerStats:
    """Cost of a clock read (fastest of a few loops of reads) and its resolution."""
    c = clock
    cost = NEVER
    for _ in range(trials):
        t0 = c()
        for _ in range(reads):
            c()
        cost = min(cost, (c() - t0) // reads)
    step = NEVER
    for _ in range(2000):
        a = b = c()
        while b == a:
            b = c()
        step = min(step, b - a)
    return TimerStats(int(cost), int(step))


def agreed_timer(comm: Any, stats: TimerStats) -> TimerStats:
    """The worst timer of all ranks, so every rank applies the same limits."""
    from mpi4py import MPI

    cost = comm.allreduce(stats.cost_ns, op=MPI.MAX)
    step = comm.allreduce(stats.resolution_ns, op=MPI.MAX)
    return TimerStats(cost, step)


def ms(ns: float) -> str:
    return f"{ns / 1e6:.3f} ms"
