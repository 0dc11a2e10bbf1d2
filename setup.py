"""The compiled parts of mckmpi (see pyproject.toml for everything else): the offload proxy's
per-call hot path, the MPI_Abort wrapper that records a Python app's own abort (built against
the MPI library mpi4py uses, with its compiler wrapper's flags), and the MPI_Abort recorder
preloaded into an MPI executable (mpi.h's types only: not linked to MPI, so it loads into any
process). A C compiler and the MPI development files are needed to install mckmpi;
launch/setup installs both."""

import shlex
import subprocess

from setuptools import Extension, setup


def mpi_flags() -> dict[str, list[str]]:
    """Include and link flags of the system MPI, from its mpicc (Open MPI's --showme, else
    MPICH's -compile_info/-link_info)."""
    for compile_query, link_query in (("--showme:compile", "--showme:link"),
                                      ("-compile_info", "-link_info")):
        try:
            flags = [shlex.split(subprocess.run(["mpicc", query], capture_output=True,
                                                text=True, check=True).stdout)
                     for query in (compile_query, link_query)]
        except (OSError, subprocess.CalledProcessError):
            continue
        words = flags[0] + flags[1]
        return {
            "include_dirs": [w[2:] for w in words if w.startswith("-I")],
            "library_dirs": [w[2:] for w in words if w.startswith("-L")],
            "libraries": [w[2:] for w in words if w.startswith("-l")],
        }
    raise SystemExit("mckmpi: error: mpicc not found: install the MPI development files "
                     "(Debian: libopenmpi-dev), as launch/setup does")


MPI = mpi_flags()
setup(ext_modules=[
    Extension("mckmpi.offload._fastpath", ["mckmpi/offload/_fastpath.c"],
              extra_compile_args=["-O2", "-Wall"]),
    Extension("mckmpi._mpiabort", ["mckmpi/_mpiabort.c"], extra_compile_args=["-O2", "-Wall"],
              **MPI),
    # A plain shared library (no module init): LD_PRELOADed, never imported (mckmpi.external).
    Extension("mckmpi._abortrecord", ["mckmpi/_abortrecord.c"],
              extra_compile_args=["-O2", "-Wall"], libraries=["dl"],
              include_dirs=MPI["include_dirs"]),
])
