"""What an app sees of the harness: `mckmpi.context()`.

Under `mckmpi run` the context carries the rank's placement, its partition, the memory
provider (the LWK arena in lwk mode, numpy in linux mode), the scheduler and the tracer.
An app started without the harness (``mpiexec -n 2 python apps/stencil.py``) gets a bare
context with the same interface: numpy memory, no scheduler, a tracer that keeps nothing.
So every app runs unchanged in both modes and bare, and the harness's own cost can be
measured against the bare run.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mckmpi.node.partition import NodePlan
from mckmpi.node.placement import Placement, from_env
from mckmpi.trace.tracer import Tracer


class NumpyMemory:
    """Linux-mode memory: numpy's default allocator, with the arena's interface."""

    empty = staticmethod(np.empty)
    zeros = staticmethod(np.zeros)
    full = staticmethod(np.full)
    empty_like = staticmethod(np.empty_like)
    zeros_like = staticmethod(np.zeros_like)

    @staticmethod
    def asarray(a: Any, dtype: Any = None) -> np.ndarray:
        return np.array(a, dtype=dtype)

    def free(self, arr: np.ndarray) -> None:
        """Nothing to return: the array's memory goes back when the array dies."""

    def stats(self) -> dict[str, Any]:
        return {}


@dataclass
class Context:
    """The harness as one rank's app sees it."""

    placement: Placement
    mode: str = "linux"
    harness: bool = False
    tracer: Tracer = field(default_factory=lambda: Tracer(enabled=False))
    mem: Any = field(default_factory=NumpyMemory)
    scheduler: Any = None
    node_plan: NodePlan | None = None
    comm: Any = None  # MPI.COMM_WORLD once initialised
    offload: Any = None  # the rank's OffloadSession when I/O is offloaded (its .channel())
    phase_marks: Any = None  # told where the app's measured phases begin and end (begin/end)
    cleanups: list[Callable[[], Any]] = field(default_factory=list)

    def on_end(self, cleanup: Callable[[], Any]) -> None:
        """Run `cleanup` as soon as the job is signalled to end (SIGTERM: cancelled, out of
        time, or aborted by another rank), from a thread, even while the app is stuck in an
        MPI call (mpiexec sends SIGKILL a second later): temporary files must not outlive
        the job. Under the harness only; the app still cleans up on its own paths."""
        self.cleanups.append(cleanup)


_current: Context | None = None


def context() -> Context:
    """The running rank's context; a bare one when the app runs without the harness."""
    global _current
    if _current is None:
        _current = Context(placement=from_env(os.environ))
    return _current


def current_context() -> Context | None:
    """The context set by the harness, if any (never creates a bare one)."""
    return _current


def set_context(ctx: Context | None) -> None:
    global _current
    _current = ctx
