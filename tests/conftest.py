"""Shared test helpers: launching real MPI jobs of `mckmpi run` with timeouts."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import pytest

from mckmpi.jobs import launchers
from mckmpi.jobs.launchers import Job

ROOT = Path(__file__).resolve().parent.parent
APPS = ROOT / "apps"


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Under `mpiexec ... pytest --with-mpi` every rank is a pytest session: each gets its own
    base temporary directory, or their clean-ups of old numbered directories race."""
    if config.getoption("with_mpi", default=False) and config.option.basetemp is None:
        from mpi4py import MPI

        rank = MPI.COMM_WORLD.Get_rank()
        config.option.basetemp = str(Path(tempfile.gettempdir()) / f"pytest-mckmpi-mpi-rank{rank}")


def job_env(**extra: str) -> dict[str, str]:
    """The environment of a test job: the one policy of every job (`launchers.job_env`)."""
    return launchers.job_env(extra)


def mckmpi(*args: str, timeout: float = 60, env: dict[str, str] | None = None,
           cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`mckmpi ARGS` as a subprocess (one rank or a plain command)."""
    launch = Job(("-m", "mckmpi", *args), options=None).render("local")
    return subprocess.run(launch.argv, capture_output=True, text=True, timeout=timeout,
                          env=env or launch.env, cwd=cwd)


def mpirun(n: int, *args: str, timeout: float = 90, env: dict[str, str] | None = None,
           oversubscribe: bool = False, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`mpiexec -n N python -m mckmpi ARGS`, killed (with its ranks) after `timeout`."""
    launch = Job(("-m", "mckmpi", *args), n, options=None,
                 oversubscribe=oversubscribe).render("mpiexec")
    return subprocess.run(launch.argv, capture_output=True, text=True, timeout=timeout,
                          env=env or launch.env, cwd=cwd)


@pytest.fixture
def shared_tmp(tmp_path: Path) -> Path:
    """A directory all ranks of an `mpi` test agree on (rank 0's tmp_path)."""
    from mpi4py import MPI

    return Path(MPI.COMM_WORLD.bcast(str(tmp_path), root=0))
