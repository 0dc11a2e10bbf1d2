"""The unit of work: a numpy kernel writing into preallocated outputs, calibrated so a
quantum costs the same on every rank and allocates nothing in the timed loop."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from mckmpi.appkit.inject import Injector
from mckmpi.appkit.timing import NEVER, clock

#: Elements of the work kernel's array: 16 KiB of float64 stays in L1/L2, so a unit of
#: work is compute, not memory traffic, and costs the same on every rank.
KERNEL_ELEMENTS = 2048



class WorkKernel:
    """A fixed unit of compute: `np.sqrt` over a cache-resident array, written in place.

    One unit is one ufunc call, so the interpreter's share is a small, constant part of it
    and nothing is allocated. With an injector, the clock is checked after every unit.
    """

    def __init__(self, mem: Any, elements: int = KERNEL_ELEMENTS) -> None:
        self.elements = elements
        self.x = mem.full(elements, 2.0)
        self.y = mem.empty(elements)

    def run(self, reps: int) -> None:
        x, y, sqrt = self.x, self.y, np.sqrt
        for _ in range(reps):
            sqrt(x, out=y)

    def run_injected(self, reps: int, injector: Injector) -> None:
        x, y, sqrt, c = self.x, self.y, np.sqrt, clock
        for _ in range(reps):
            sqrt(x, out=y)
            if c() >= injector.due:
                injector.fire()

    def runner(self, injector: Injector) -> Callable[[int], None]:
        """The loop to time: the plain one, or the one that checks the clock per unit."""
        if injector.active:
            return lambda reps: self.run_injected(reps, injector)
        return self.run

    def unit_ns(self, run: Callable[[int], None], min_batch_ns: int = 50_000,
                trials: int = 21, min_total_ns: int = 200_000_000) -> float:
        """Fastest time of one unit through `run`, from batches long enough to time well,
        repeated for at least `min_total_ns`: a core's speed drifts (frequency ramps, a
        virtual CPU's host), and a unit timed in a slow moment makes every sample short."""
        batch = 1
        while True:
            t0 = clock()
            run(batch)
            if clock() - t0 >= min_batch_ns or batch >= 1 << 20:
                break
            batch *= 2
        best = NEVER
        started = clock()
        done = 0
        while done < trials or clock() - started < min_total_ns:
            t0 = clock()
            run(batch)
            best = min(best, clock() - t0)
            done += 1
        return best / batch

    def verify(self) -> bool:
        """The kernel computed what it should (sqrt(2) everywhere)."""
        return bool(np.allclose(self.y, math.sqrt(2.0), rtol=1e-15, atol=0))


def reps_for(quantum_ns: int, unit_ns: float) -> int:
    """Units of work that take at least `quantum_ns` on a quiet core."""
    return max(1, math.ceil(quantum_ns / unit_ns))
