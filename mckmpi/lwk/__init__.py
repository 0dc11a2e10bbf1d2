"""The lightweight-kernel side of a rank.

`tlsf` (the bounded-time allocator), `arena` (the rank's pre-faulted memfd memory handing
out numpy arrays), `scheduler` (cooperative, tick-less tasks), `workers` (pinned threads
polled by the scheduler), `quiet` (Python's own noise: GC, switch interval, policy) and
`runtime` (booting them in order from `LwkOptions`).

`safepoint()` is the one call an lwk-mode app makes to let the harness's deferred work run
at a point of its choosing (between measured phases): the frozen garbage collector, and a
due flush of the trace (which an app otherwise gives a safe point by setting a stream's
``filled``, see `mckmpi.trace.tracer.FlushTurn`).
"""

from mckmpi.context import context
from mckmpi.lwk import quiet


def safepoint(full: bool = False) -> int:
    """Collect the garbage now (`full`: also among frozen objects) and let a due trace flush
    run; the ns the collection took."""
    spent = quiet.safepoint(full)
    turn = context().tracer.turn
    if turn is not None:
        turn.give()
    return spent


__all__ = ["safepoint"]
