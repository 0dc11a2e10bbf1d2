"""Run inside every rank of `mpiexec -n 2` and `-n 4` (pytest-mpi)."""

import os

import numpy as np
import pytest

from mckmpi.errors import PlacementError
from mckmpi.node.placement import from_env, verify, with_vnodes
from mckmpi.trace.reader import open_run
from mckmpi.trace.tracer import Tracer
from mckmpi.trace.writer import parallel_available, write_run


@pytest.mark.mpi(min_size=2)
def test_placement_verified_against_mpi():
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    p = from_env(os.environ)
    assert p.launcher == "openmpi"
    checked, node_comm = verify(p, comm)
    assert checked.node == 0 and checked.nnodes == 1
    assert node_comm.Get_size() == comm.Get_size()


@pytest.mark.mpi(min_size=2)
def test_vnodes_give_separate_node_communicators():
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    p = with_vnodes(from_env(os.environ), 2)
    checked, node_comm = verify(p, comm)
    assert checked.nnodes == 2
    members = node_comm.allgather(comm.Get_rank())
    assert all(m * 2 // comm.Get_size() == checked.vnode for m in members)


@pytest.mark.mpi(min_size=2)
def test_contradicting_launcher_is_a_clear_error_on_every_rank():
    from dataclasses import replace

    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    p = from_env(os.environ)
    lying = replace(p, local_rank=0)  # every rank claims local rank 0 on one host
    with pytest.raises(PlacementError, match="local ranks"):
        verify(lying, comm)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("method", ["parallel", "gather"])
def test_collective_write_round_trip(shared_tmp, method):
    from mpi4py import MPI

    if method == "parallel" and not parallel_available():
        pytest.fail("h5py was built without MPI")
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    t = Tracer()
    t.scalar("app", "value", rank * 10, units="widgets")
    t.array("noise", "samples", np.arange(5, dtype=np.int64) + rank, units="ns")
    rows = np.zeros(rank, dtype=[("t_ns", "i8"), ("dur_ns", "i8")])  # rank 0 has no rows
    rows["t_ns"] = np.arange(rank)
    t.table("noise", "events", rows, units={"t_ns": "ns"})
    t.attrs("noise", source="test")
    path = shared_tmp / f"w-{method}.h5"
    write_run(comm, path, t, {"mode": "linux", "world_size": size}, {"python": "3"}, method=method)
    if rank == 0:
        with open_run(path) as run:
            assert list(run["app/value"][()]) == [r * 10 for r in range(size)]
            assert run.units("app/value") == "widgets"
            assert (run["noise/samples"][()] == np.arange(5) + np.arange(size)[:, None]).all()
            ev = run["noise/events"][()]
            assert len(ev) == sum(range(size))
            assert list(ev["rank"]) == [r for r in range(size) for _ in range(r)]
            assert run.units("noise/events", "t_ns") == "ns"
            assert run.file["noise"].attrs["source"] == "test"
            assert run.attrs["complete"]
    comm.Barrier()


@pytest.mark.mpi(min_size=2)
def test_disagreeing_shapes_fail_on_every_rank(shared_tmp):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    t = Tracer()
    t.array("noise", "x", np.zeros(3 + comm.Get_rank()))
    with pytest.raises(ValueError, match="different shapes"):
        write_run(comm, shared_tmp / "bad.h5", t, {}, {})
