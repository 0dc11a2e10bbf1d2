"""Where a rank is: global rank, node, local rank, host.

Placement is read from the launcher's environment before MPI starts (so the partition can
be planned and errors reported symmetrically by every rank), then checked against what MPI
itself reports (`COMM_WORLD.Split_type(COMM_TYPE_SHARED)` groups the ranks of one host).
A contradiction is an error, never a guess.

Launcher dialects register themselves with `@dialect`; the first whose variables are present
wins, most specific first (an ``mpiexec`` inside a Slurm allocation still sees the
allocation's SLURM_* variables, so Open MPI and Hydra come before Slurm).
"""

from __future__ import annotations

import dataclasses
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mckmpi.errors import PlacementError

if TYPE_CHECKING:
    from mpi4py import MPI


@dataclass(frozen=True)
class Placement:
    """One rank's position. `node`/`nnodes` are None until known (Open MPI and Hydra do not
    export a node id: it is derived from MPI's shared-memory split in `verify`)."""

    rank: int
    size: int
    local_rank: int
    local_size: int
    host: str
    launcher: str
    node: int | None = None
    nnodes: int | None = None
    vnode: int = 0  # index of this rank's virtual node on its launcher node
    vnodes: int = 1
    pmi: str = ""  # under srun: the PMI its --mpi plugin offers (pmix, pmi2, none)


_Reader = Callable[[Mapping[str, str], str], Placement]
_DIALECTS: list[tuple[str, str, _Reader]] = []


def dialect(name: str, marker: str) -> Callable[[_Reader], _Reader]:
    """Register a launcher dialect recognised by the presence of the variable `marker`."""

    def register(reader: _Reader) -> _Reader:
        _DIALECTS.append((name, marker, reader))
        return reader

    return register


def _int(env: Mapping[str, str], *names: str) -> int:
    for name in names:
        if name in env:
            try:
                return int(env[name])
            except ValueError:
                raise PlacementError(f"{name}={env[name]!r} is not a number") from None
    raise PlacementError(f"launcher environment incomplete: none of {', '.join(names)} is set")


@dialect("openmpi", "OMPI_COMM_WORLD_SIZE")
def _openmpi(env: Mapping[str, str], host: str) -> Placement:
    return Placement(
        rank=_int(env, "OMPI_COMM_WORLD_RANK"),
        size=_int(env, "OMPI_COMM_WORLD_SIZE"),
        local_rank=_int(env, "OMPI_COMM_WORLD_LOCAL_RANK"),
        local_size=_int(env, "OMPI_COMM_WORLD_LOCAL_SIZE"),
        host=host,
        launcher="openmpi",
    )


# MPI_LOCALRANKID marks Hydra: srun --mpi=pmi2 also sets PMI_RANK and PMI_SIZE (and PMI_FD),
# so those alone would take a Slurm step for an MPICH launch.
@dialect("hydra", "MPI_LOCALRANKID")
def _hydra(env: Mapping[str, str], host: str) -> Placement:
    return Placement(
        rank=_int(env, "PMI_RANK"),
        size=_int(env, "PMI_SIZE"),
        local_rank=_int(env, "MPI_LOCALRANKID"),
        local_size=_int(env, "MPI_LOCALNRANKS"),
        host=host,
        launcher="hydra",
    )


@dialect("slurm", "SLURM_STEP_ID")
def _slurm(env: Mapping[str, str], host: str) -> Placement:
    # SLURM_STEP_ID marks a task of a job step (srun); a batch script's SLURM_NTASKS
    # describes the allocation, not a step, so it is not taken as a placement.
    tasks_per_node = _step_tasks_on_node(env)
    return Placement(
        rank=_int(env, "SLURM_PROCID"),
        size=_int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"),
        local_rank=_int(env, "SLURM_LOCALID"),
        local_size=tasks_per_node,
        host=env.get("SLURMD_NODENAME", host),
        launcher="slurm",
        pmi=slurm_pmi(env),
        node=_int(env, "SLURM_NODEID"),
        nnodes=_int(env, "SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES"),
    )


def slurm_pmi(env: Mapping[str, str]) -> str:
    """Which process-management interface srun offers the ranks (its --mpi plugin):
    PMIx sets PMIX_RANK, PMI-2 sets PMI_FD with PMI_RANK; without either, none."""
    if "PMIX_RANK" in env:
        return "pmix"
    if "PMI_FD" in env and "PMI_RANK" in env:
        return "pmi2"
    return "none"


def _step_tasks_on_node(env: Mapping[str, str]) -> int:
    """Tasks of this step on this node, from SLURM_STEP_TASKS_PER_NODE ('2(x3),1')."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if not spec:
        raise PlacementError("Slurm step without SLURM_STEP_TASKS_PER_NODE: cannot count local tasks")
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d{1,9})(?:\(x(\d{1,9})\))?", part.strip())
        if m is None:
            raise PlacementError(f"SLURM_STEP_TASKS_PER_NODE={spec!r} is not a task count list")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
        if len(counts) > 1 << 20:
            raise PlacementError(f"SLURM_STEP_TASKS_PER_NODE={spec!r} names more nodes "
                                 "than any cluster has")
    node = _int(env, "SLURM_NODEID")
    if node >= len(counts):
        raise PlacementError(f"SLURM_NODEID={node} outside SLURM_STEP_TASKS_PER_NODE={spec!r}")
    return counts[node]


def from_env(env: Mapping[str, str], host: str | None = None) -> Placement:
    """The placement the launcher announced; a lone process is a one-rank job (singleton)."""
    host = host or socket.gethostname()
    for _name, marker, reader in _DIALECTS:
        if marker in env:
            p = reader(env, host)
            _check_ranges(p)
            return p
    return Placement(rank=0, size=1, local_rank=0, local_size=1, host=host, launcher="singleton",
                     node=0, nnodes=1)


def _check_ranges(p: Placement) -> None:
    if not (0 <= p.rank < p.size and 0 <= p.local_rank < p.local_size <= p.size):
        raise PlacementError(
            f"{p.launcher} placement out of range: rank {p.rank}/{p.size}, "
            f"local rank {p.local_rank}/{p.local_size}"
        )


def with_vnodes(p: Placement, k: int) -> Placement:
    """Split the launcher node's ranks into `k` virtual nodes of contiguous local ranks.

    Local rank l goes to virtual node l*k // n; the node's CPUs are split the same way by
    the partition, so each virtual node has its own Linux cores and proxy.
    """
    if k == 1:
        return p
    n = p.local_size
    if k > n:
        raise PlacementError(f"--vnodes {k} needs at least {k} ranks per node; this node has {n}")
    v = p.local_rank * k // n
    first, end = -(-v * n // k), -(-(v + 1) * n // k)
    return dataclasses.replace(
        p, vnode=v, vnodes=k, local_rank=p.local_rank - first, local_size=end - first,
        node=None if p.node is None else p.node * k + v,
        nnodes=None if p.nnodes is None else p.nnodes * k,
    )


def verify(p: Placement, comm: MPI.Intracomm) -> tuple[Placement, MPI.Intracomm]:
    """Check the launcher's placement against MPI and complete the node ids.

    Returns the placement with `node`/`nnodes` filled in and the communicator of this
    rank's (virtual) node. Every rank sees the same gathered facts, so every rank reaches
    the same verdict and raises together: nobody is left waiting in a collective.
    """
    from mpi4py import MPI

    if comm.Get_size() != p.size or comm.Get_rank() != p.rank:
        hint = "was mckmpi started by a different launcher than the MPI library expects?"
        if p.launcher == "slurm" and comm.Get_size() == 1:
            hint = (f"the MPI library did not join srun's PMI ({p.pmi}): start the job with "
                    "the --mpi plugin it speaks (Open MPI: srun --mpi=pmix; see srun --mpi=list)")
        raise PlacementError(
            f"launcher ({p.launcher}) says rank {p.rank} of {p.size}, MPI says rank "
            f"{comm.Get_rank()} of {comm.Get_size()}: {hint}"
        )
    shared = comm.Split_type(MPI.COMM_TYPE_SHARED, key=p.rank)
    host_members = tuple(shared.allgather(p.rank))
    shared.Free()
    facts = comm.allgather((p.rank, p.host, p.node, p.vnode, p.local_rank, host_members))

    # Hosts are MPI's shared-memory groups, numbered by their lowest world rank.
    host_ids = {members: i for i, members in enumerate(sorted({f[5] for f in facts}))}

    def node_of(f: tuple) -> int:
        return f[2] if f[2] is not None else host_ids[f[5]] * p.vnodes + f[3]

    nodes: dict[int, list[tuple]] = {}
    for f in facts:
        nodes.setdefault(node_of(f), []).append(f)
    for node, members in sorted(nodes.items()):
        hosts = {f[5] for f in members}
        if len(hosts) != 1:
            raise PlacementError(
                f"node {node} spans several hosts per MPI (ranks "
                f"{', '.join(str(f[0]) for f in members)}): launcher node ids are wrong"
            )
        names = {f[1] for f in members}
        if len(names) != 1:
            raise PlacementError(f"ranks of node {node} report different host names: {sorted(names)}")
        local = sorted(f[4] for f in members)
        if local != list(range(len(members))):
            raise PlacementError(
                f"node {node}: local ranks {local} from {p.launcher} do not match the "
                f"{len(members)} ranks MPI places there"
            )
    mine = node_of(facts[p.rank])
    if p.local_size != len(nodes[mine]):
        raise PlacementError(
            f"rank {p.rank}: launcher says {p.local_size} ranks on this node, MPI finds {len(nodes[mine])}"
        )
    node_comm = comm.Split(color=mine, key=p.rank)
    return dataclasses.replace(p, node=mine, nnodes=len(nodes)), node_comm
