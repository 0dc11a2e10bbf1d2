"""Running an app's measured phases: collective verification, per-phase records in the
run file, and the phase loop under the LWK scheduler when there is one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


class VerificationError(RuntimeError):
    """The app's numerical result is wrong: a failed run, not a usage error."""


def verify_all(comm: Any, ok: bool, message: str) -> None:
    """Raise on every rank if the check failed on any (so no rank waits for another)."""
    from mpi4py import MPI

    if not comm.allreduce(bool(ok), op=MPI.LAND):
        raise VerificationError(message)


def stream_phases(tracer: Any, iter_ns: np.ndarray, compute_ns: np.ndarray,
                  comm_ns: np.ndarray, **more: np.ndarray) -> Any:
    """Register the per-iteration times every mini-app records ([iterations] int64 ns per
    rank: app/iter_ns, app/compute_ns, app/comm_ns and `more` by name) as one stream, before
    the loop: set ``.filled`` on the returned stream as iterations complete, and they reach
    the run file while the app runs."""
    times = tracer.stream("app", "iter_ns", iter_ns, units="ns")
    for name, values in (("compute_ns", compute_ns), ("comm_ns", comm_ns), *more.items()):
        tracer.stream("app", name, values, units="ns", along=times)
    return times


def run_phases(ctx: Any, fn: Callable[[], Any]) -> Any:
    """Run the app's measured phases as a task of the rank's scheduler when it has one.

    In lwk mode this is where the cooperative scheduler takes over the rank's thread; in
    linux mode and bare the phases simply run. The harness's kernel counters are told where
    the phases begin and end (`Context.phase_marks`), so the run file separates the steady
    state from start-up and teardown.
    """
    marks = ctx.phase_marks
    if marks is not None:
        marks.begin()
    try:
        return _run(ctx, fn)
    finally:
        if marks is not None:
            marks.end()


def _run(ctx: Any, fn: Callable[[], Any]) -> Any:
    sched = ctx.scheduler
    if sched is None:
        return fn()
    from mckmpi.lwk.scheduler import current_task

    try:
        current_task()
    except RuntimeError:
        return sched.run(fn)
    return fn()  # already inside a task of the scheduler
