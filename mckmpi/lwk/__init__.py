"""The lightweight-kernel side of a rank: arena memory, scheduler and runtime.

`safepoint()` is the one call an lwk-mode app makes to let the frozen garbage collector run,
at a point of its choosing (between measured phases).
"""

from mckmpi.lwk.quiet import safepoint

__all__ = ["safepoint"]
