"""mckmpi: a user-space multi-kernel harness for MPI jobs.

Every rank runs inside an LWK partition runtime (own cores, a pre-reserved memory arena,
a cooperative tick-less scheduler) and offloads its I/O system calls to a per-node Linux
proxy; jitter and scaling are recorded as HDF5 run files. Apps reach the harness through
`mckmpi.context()`.
"""

from importlib.metadata import PackageNotFoundError, version

from mckmpi.context import Context, context

try:
    __version__ = version("mckmpi")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

__all__ = ["Context", "context", "__version__"]
