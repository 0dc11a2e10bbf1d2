"""The partition plan of a node: Linux (service) cores, LWK cores per rank, memory per rank.

IHK "reserves" CPUs and memory for the LWK and "assigns" them to it; mckmpi computes the
same split in user space. The plan is a pure function of facts passed in (the node's CPUs,
NUMA layout, available memory, rank count, options), so every rank of a node computes the
same plan without talking, and tests need neither MPI nor root. `mckmpi.node.host.read_host`
gathers the facts of the running host.

Why the node's CPUs come from the cpuset and not from this process's affinity: launchers bind
each rank to its own core (Open MPI binds to core by default, srun --cpu-bind likewise), so the
affinity differs between ranks of one node. The cpuset of the process's cgroup (Slurm's job
cpuset, or the whole machine) is the same for all of them; under Slurm the union of the
step's binding masks (SLURM_CPU_BIND_LIST) narrows it to the step's CPUs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from mckmpi.errors import PartitionError
from mckmpi.node.host import NodeFacts
from mckmpi.utility.units import format_cpulist, format_size, parse_cpulist
from mckmpi.utility.table import counted


#: The smallest LWK arena a rank may ask for: below it no app's buffers fit, and a size
#: without a unit ('--mem 512', meant as MiB) is bytes.
MIN_ARENA = 1 << 20


@dataclass(frozen=True)
class RankPlan:
    """The cores and memory of one local rank."""

    local_rank: int
    cpus: tuple[int, ...]
    numa_node: int
    mem: int


@dataclass(frozen=True)
class NodePlan:
    """One node's split. In linux mode every CPU stays Linux's and ranks spread over all of
    them, as users run jobs today; in lwk mode ranks never share a core with the proxy
    unless oversubscription was asked for."""

    mode: str
    cpus: tuple[int, ...]
    linux_cpus: tuple[int, ...]
    lwk_cpus: tuple[int, ...]
    ranks: tuple[RankPlan, ...]
    mem_per_rank: int
    oversubscribed: bool

    def rank(self, local_rank: int) -> RankPlan:
        return self.ranks[local_rank]

    def describe(self) -> str:
        """One line for logs and the run file."""
        return (
            f"{self.mode}: linux cpus {format_cpulist(self.linux_cpus)}, lwk cpus "
            f"{format_cpulist(self.lwk_cpus) or '-'}, {counted(len(self.ranks), 'rank')}, "
            f"mem/rank {format_size(self.mem_per_rank) if self.mem_per_rank else '-'}"
            + (", oversubscribed" if self.oversubscribed else "")
        )


#: Oversubscription has a limit: beyond it a plan is a mistake, not a job (and listing
#: 10^8 ranks would take the node's memory).
MAX_RANKS_PER_CPU = 64


def plan_node(
    facts: NodeFacts,
    nranks: int,
    *,
    mode: str,
    linux_cores: str | tuple[int, ...] = "1",
    lwk_cores: tuple[int, ...] | None = None,
    mem: int = 256 * 1024**2,
    oversubscribe: bool = False,
) -> NodePlan:
    """Split one node's CPUs and memory among Linux and `nranks` ranks, or explain why not."""
    if nranks < 1:
        raise PartitionError(f"a node needs at least one rank, got {nranks}")
    if not facts.cpus:
        raise PartitionError("no CPUs are allowed on this node")
    if nranks > MAX_RANKS_PER_CPU * len(facts.cpus):
        raise PartitionError(
            f"{nranks} ranks on {len(facts.cpus)} CPUs is more than {MAX_RANKS_PER_CPU} per CPU, "
            "even oversubscribed: use more nodes or fewer ranks"
        )
    if mode == "linux":
        linux, lwk = facts.cpus, facts.cpus
    else:
        linux = _linux_cpus(facts, linux_cores)
        lwk = _lwk_cpus(facts, linux, lwk_cores)
    if mode == "lwk" and not lwk and not oversubscribe:
        raise PartitionError(
            f"no LWK cores left: the node's {len(facts.cpus)} CPUs are all Linux cores; use "
            "fewer --linux-cores, or --oversubscribe to run ranks on the Linux cores"
        )
    shared_pool = lwk or linux
    if nranks > len(shared_pool) and not oversubscribe:
        side = ("CPU", "CPUs") if mode == "linux" else ("LWK core", "LWK cores")
        where = ("" if mode == "linux"
                 else f" (of {len(facts.cpus)} CPUs, {len(linux)} kept for Linux)")
        raise PartitionError(
            f"{counted(nranks, 'rank')} need {counted(nranks, 'core')} but the node has "
            f"{counted(len(shared_pool), *side)}{where}: "
            "use --oversubscribe, fewer ranks per node"
            + (" or fewer --linux-cores" if mode == "lwk" else "")
        )
    oversubscribed = nranks > len(shared_pool) or (mode == "lwk" and not lwk)
    per_rank = max(1, len(shared_pool) // nranks)
    ranks = []
    for r in range(nranks):
        if nranks <= len(shared_pool):
            cpus = shared_pool[r * per_rank:(r + 1) * per_rank]
        else:
            cpus = (shared_pool[r % len(shared_pool)],)
        ranks.append(RankPlan(local_rank=r, cpus=cpus, numa_node=facts.numa_of(cpus[0]),
                              mem=mem if mode == "lwk" else 0))
    if mode == "lwk" and mem < MIN_ARENA:
        raise PartitionError(
            f"--mem {mem} is {format_size(mem)}: an LWK arena needs at least "
            f"{format_size(MIN_ARENA)} (sizes take a unit: 256M, 1G)"
        )
    if mode == "lwk" and facts.mem_available and nranks * mem > facts.mem_available:
        raise PartitionError(
            f"--mem {format_size(mem)} x {counted(nranks, 'rank')} = {format_size(nranks * mem)} "
            f"exceeds the "
            f"{format_size(facts.mem_available)} available on this node"
        )
    return NodePlan(
        mode=mode, cpus=facts.cpus, linux_cpus=linux, lwk_cpus=lwk if mode == "lwk" else (),
        ranks=tuple(ranks), mem_per_rank=mem if mode == "lwk" else 0, oversubscribed=oversubscribed,
    )


def _linux_cpus(facts: NodeFacts, spec: str | tuple[int, ...]) -> tuple[int, ...]:
    """A count ('2': the lowest CPUs, spread over NUMA nodes) or a list ('0,4' or a tuple).
    A lone number is a count: CPU 3 alone is written '3-3'."""
    if isinstance(spec, str) and spec.strip().isascii() and spec.strip().isdigit():
        count = int(spec)
        if count > len(facts.cpus):
            raise PartitionError(f"--linux-cores {count} exceeds the node's {len(facts.cpus)} CPUs")
        cpus = _spread(facts, count)
    else:
        cpus = spec if isinstance(spec, tuple) else parse_cpulist(spec)
        _check_known(facts, cpus, "--linux-cores")
    if not cpus:
        raise PartitionError("--linux-cores must keep at least one core for Linux and the proxy")
    return cpus


def core_spec_linux_cores(facts: NodeFacts, spec_cpus: Iterable[int]) -> tuple[int, ...] | None:
    """Slurm's specialised CPUs (CoreSpecCount/CPUSpecList) as this node's Linux cores.

    Slurm keeps specialised cores for the system daemons, the role McKernel gives its Linux
    cores, so they are the natural home of Linux and the proxy. That works only where the
    ranks may run on them: a job owns them when it asks (`--core-spec=0`, if the cluster has
    AllowSpecResourcesUsage=YES) or when nothing fences CPUs off. None when some of them lie
    outside the node's allowed CPUs (Slurm keeps them from the job; the usual default then
    applies) or when they would leave no CPU for the LWK.
    """
    spec = tuple(sorted(set(spec_cpus)))
    if not spec or not set(spec) <= set(facts.cpus) or len(spec) >= len(facts.cpus):
        return None
    return spec


def _spread(facts: NodeFacts, count: int) -> tuple[int, ...]:
    """The lowest CPUs, one per NUMA node in turn, so each memory domain keeps a service core."""
    by_node: dict[int, list[int]] = {}
    for cpu in facts.cpus:
        by_node.setdefault(facts.numa_of(cpu), []).append(cpu)
    queues = [by_node[n] for n in sorted(by_node)]
    chosen: list[int] = []
    while len(chosen) < count:
        for q in queues:
            if q and len(chosen) < count:
                chosen.append(q.pop(0))
    return tuple(sorted(chosen))


def _lwk_cpus(facts: NodeFacts, linux: tuple[int, ...], spec: tuple[int, ...] | None) -> tuple[int, ...]:
    if spec is None:
        return tuple(c for c in facts.cpus if c not in linux)
    _check_known(facts, spec, "--lwk-cores")
    overlap = set(spec) & set(linux)
    if overlap:
        raise PartitionError(
            f"--lwk-cores and the Linux cores overlap on CPU {format_cpulist(overlap)}"
        )
    return tuple(spec)


def _check_known(facts: NodeFacts, cpus: tuple[int, ...], what: str) -> None:
    unknown = sorted(set(cpus) - set(facts.cpus))
    if unknown:
        raise PartitionError(
            f"{what} names CPU {format_cpulist(unknown)}, not allowed on this node "
            f"(allowed: {format_cpulist(facts.cpus)})"
        )


def node_facts(host: NodeFacts, vnodes: int, vnode: int) -> NodeFacts:
    """The share of the host that virtual node `vnode` of `vnodes` owns."""
    return host if vnodes == 1 else host.split(vnodes)[vnode]

