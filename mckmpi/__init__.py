"""mckmpi: a user-space multi-kernel harness for MPI jobs.

Every rank runs inside an LWK partition runtime (own cores, a pre-reserved memory arena,
a cooperative tick-less scheduler) and offloads its I/O system calls to a per-node Linux
proxy; jitter and scaling are recorded as HDF5 run files. Apps reach the harness through
`mckmpi.context()`; results are opened with `mckmpi.open_run(path)` and
`mckmpi.open_study(dir)` (loaded on first use: the ranks never import the readers).
"""

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from mckmpi.context import Context, context

try:
    __version__ = version("mckmpi")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

__all__ = ["Context", "context", "open_run", "open_study", "__version__"]

#: Names loaded on first use, from the module that defines them.
_LAZY = {"open_run": "mckmpi.trace.reader", "open_study": "mckmpi.analysis.study"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mckmpi' has no attribute {name!r}")
