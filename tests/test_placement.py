import pytest

from mckmpi.errors import PlacementError
from mckmpi.node.placement import from_env, with_vnodes

OMPI = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "8",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
HYDRA = {"PMI_RANK": "5", "PMI_SIZE": "6", "MPI_LOCALRANKID": "2", "MPI_LOCALNRANKS": "3"}
SLURM = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "4", "SLURM_STEP_NUM_TASKS": "6", "SLURM_LOCALID": "0",
         "SLURM_NODEID": "2", "SLURM_STEP_NUM_NODES": "3", "SLURM_STEP_TASKS_PER_NODE": "2(x2),2",
         "SLURMD_NODENAME": "n3"}


def test_openmpi():
    p = from_env(OMPI, host="h")
    assert (p.rank, p.size, p.local_rank, p.local_size, p.launcher, p.node) == (3, 8, 1, 2, "openmpi", None)


def test_hydra():
    p = from_env(HYDRA, host="h")
    assert (p.rank, p.size, p.local_rank, p.local_size, p.launcher) == (5, 6, 2, 3, "hydra")


def test_slurm():
    p = from_env(SLURM, host="h")
    assert (p.rank, p.size, p.local_rank, p.local_size) == (4, 6, 0, 2)
    assert (p.node, p.nnodes, p.host, p.launcher) == (2, 3, "n3", "slurm")


def test_slurm_uneven_tasks_per_node():
    env = dict(SLURM, SLURM_NODEID="2", SLURM_STEP_TASKS_PER_NODE="3(x2),1", SLURM_STEP_NUM_TASKS="7",
               SLURM_PROCID="6")
    assert from_env(env, host="h").local_size == 1


def test_mpiexec_inside_allocation_prefers_openmpi():
    env = dict(SLURM, **OMPI)
    assert from_env(env, host="h").launcher == "openmpi"


def test_batch_script_is_a_singleton():
    env = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_PROCID": "0"}
    p = from_env(env, host="h")
    assert (p.launcher, p.size) == ("singleton", 1)


def test_singleton():
    p = from_env({}, host="h")
    assert (p.rank, p.size, p.local_size, p.node, p.nnodes) == (0, 1, 1, 0, 1)


@pytest.mark.parametrize("env", [
    dict(OMPI, OMPI_COMM_WORLD_RANK="8"),
    dict(OMPI, OMPI_COMM_WORLD_LOCAL_RANK="x"),
    {k: v for k, v in OMPI.items() if k != "OMPI_COMM_WORLD_LOCAL_SIZE"},
    dict(SLURM, SLURM_NODEID="5"),
])
def test_inconsistent_env_is_an_error(env):
    with pytest.raises(PlacementError):
        from_env(env, host="h")


def test_vnodes_split_contiguously():
    base = dict(OMPI, OMPI_COMM_WORLD_LOCAL_SIZE="4")
    got = []
    for local in range(4):
        p = with_vnodes(from_env(dict(base, OMPI_COMM_WORLD_LOCAL_RANK=str(local)), host="h"), 2)
        got.append((p.vnode, p.local_rank, p.local_size))
    assert got == [(0, 0, 2), (0, 1, 2), (1, 0, 2), (1, 1, 2)]


def test_vnodes_uneven_and_node_ids():
    env = dict(SLURM, SLURM_STEP_TASKS_PER_NODE="3(x3)", SLURM_STEP_NUM_TASKS="9")
    parts = [with_vnodes(from_env(dict(env, SLURM_LOCALID=str(i)), host="h"), 2) for i in range(3)]
    assert [(p.vnode, p.local_rank, p.local_size) for p in parts] == [(0, 0, 2), (0, 1, 2), (1, 0, 1)]
    assert [p.node for p in parts] == [4, 4, 5] and parts[0].nnodes == 6


def test_too_many_vnodes():
    with pytest.raises(PlacementError, match="vnodes 3"):
        with_vnodes(from_env(OMPI, host="h"), 3)


def test_srun_pmi2_is_slurm_not_hydra():
    """srun --mpi=pmi2 sets PMI_RANK/PMI_SIZE/PMI_FD too: still a Slurm step, PMI-2 noted."""
    p = from_env(dict(SLURM, PMI_RANK="4", PMI_SIZE="6", PMI_FD="9", PMI_JOBID="7.0"), host="h")
    assert (p.launcher, p.pmi, p.local_size) == ("slurm", "pmi2", 2)
    assert from_env(dict(SLURM, PMIX_RANK="4"), host="h").pmi == "pmix"
    assert from_env(SLURM, host="h").pmi == "none"


@pytest.mark.parametrize("spec", ["x", "2(x", "2(xa)", "-1", "2(x99999999)"])
def test_malformed_slurm_tasks_per_node(spec):
    with pytest.raises(PlacementError, match="SLURM_STEP_TASKS_PER_NODE"):
        from_env(dict(SLURM, SLURM_STEP_TASKS_PER_NODE=spec), host="h")
