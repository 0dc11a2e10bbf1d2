"""The lightweight-kernel side of a rank.

`tlsf` (the bounded-time allocator), `arena` (the rank's pre-faulted memfd memory handing
out numpy arrays), `scheduler` (cooperative, tick-less tasks), `workers` (pinned threads
polled by the scheduler), `quiet` (Python's own noise: GC, switch interval, policy) and
`runtime` (booting them in order from `LwkOptions`).

`safepoint()` is the one call an lwk-mode app makes to let the frozen garbage collector run,
at a point of its choosing (between measured phases).
"""

from mckmpi.lwk.quiet import safepoint

__all__ = ["safepoint"]
