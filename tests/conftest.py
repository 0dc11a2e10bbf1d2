"""pytest hooks and fixtures; the helpers tests import are in fixtures.py."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fixtures import Leftovers


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Under `mpiexec ... pytest --with-mpi` every rank is a pytest session: each gets its own
    base temporary directory, or their clean-ups of old numbered directories race."""
    if config.getoption("with_mpi", default=False) and config.option.basetemp is None:
        from mpi4py import MPI

        rank = MPI.COMM_WORLD.Get_rank()
        config.option.basetemp = str(Path(tempfile.gettempdir()) / f"pytest-mckmpi-mpi-rank{rank}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `soak` run only when asked for by marker (`make soak`: -m soak); tests
    marked `offload` are skipped, with the reason, on a kernel that cannot offload."""
    if "soak" not in (config.getoption("markexpr", default="") or ""):
        skip = pytest.mark.skip(reason="a soak test: run it with `make soak` (pytest -m soak)")
        for item in items:
            if item.get_closest_marker("soak"):
                item.add_marker(skip)
    marked = [item for item in items if item.get_closest_marker("offload")]
    if not marked:
        return
    from mckmpi.offload import seccomp

    found = seccomp.probe()
    if not found["offload_ok"]:
        skip = pytest.mark.skip(reason=f"kernel cannot offload: {found.get('error', 'no ADDFD')}")
        for item in marked:
            item.add_marker(skip)


@pytest.fixture
def shared_tmp(tmp_path: Path) -> Path:
    """A directory all ranks of an `mpi` test agree on (rank 0's tmp_path)."""
    from mpi4py import MPI

    return Path(MPI.COMM_WORLD.bcast(str(tmp_path), root=0))


@pytest.fixture(scope="session")
def result_runs(tmp_path_factory) -> dict[str, Path]:
    """One directory of small run files of every app (`fixtures.RESULT_RUNS`), written once
    per session."""
    from fixtures import write_result_runs

    return write_result_runs(tmp_path_factory.mktemp("result-runs"))
@pytest.fixture
def leftovers() -> Iterator[Leftovers]:
    """A job tag and environment; the test calls `.check()` after the job's ending."""
    job = Leftovers(f"t{uuid.uuid4().hex[:8]}")
    yield job
    shutil.rmtree(job.tmpdir, ignore_errors=True)
