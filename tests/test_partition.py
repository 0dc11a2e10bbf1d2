from pathlib import Path

import pytest

from mckmpi.errors import PartitionError
from mckmpi.node.partition import plan_node
from mckmpi.node.host import NodeFacts, cgroup_cpus, slurm_step_cpus

G = 1024**3
EIGHT = NodeFacts(cpus=tuple(range(8)), numa={0: (0, 1, 2, 3), 1: (4, 5, 6, 7)}, mem_available=16 * G)


def test_lwk_default_one_linux_core():
    plan = plan_node(EIGHT, 7, mode="lwk", mem=G)
    assert plan.linux_cpus == (0,)
    assert [r.cpus for r in plan.ranks] == [(c,) for c in range(1, 8)]
    assert [r.numa_node for r in plan.ranks] == [0, 0, 0, 1, 1, 1, 1]
    assert all(r.mem == G for r in plan.ranks) and not plan.oversubscribed


def test_linux_cores_count_spreads_over_numa():
    plan = plan_node(EIGHT, 3, mode="lwk", linux_cores="2", mem=G)
    assert plan.linux_cpus == (0, 4)
    assert [r.cpus for r in plan.ranks] == [(1, 2), (3, 5), (6, 7)]


def test_explicit_lists():
    plan = plan_node(EIGHT, 2, mode="lwk", linux_cores="6-7", lwk_cores=(0, 1, 2, 3), mem=G)
    assert plan.linux_cpus == (6, 7) and [r.cpus for r in plan.ranks] == [(0, 1), (2, 3)]


def test_linux_mode_uses_every_core():
    plan = plan_node(EIGHT, 8, mode="linux")
    assert plan.linux_cpus == tuple(range(8)) and plan.lwk_cpus == ()
    assert [r.cpus for r in plan.ranks] == [(c,) for c in range(8)]
    assert plan.mem_per_rank == 0


def test_deterministic():
    assert plan_node(EIGHT, 5, mode="lwk") == plan_node(EIGHT, 5, mode="lwk")


def test_oversubscribe_round_robin():
    two = NodeFacts(cpus=(0, 1), mem_available=8 * G)
    plan = plan_node(two, 3, mode="lwk", oversubscribe=True, mem=G)
    assert [r.cpus for r in plan.ranks] == [(1,), (1,), (1,)] and plan.oversubscribed


def test_single_cpu_node_shares_the_linux_core_when_asked():
    one = NodeFacts(cpus=(3,), mem_available=8 * G)
    with pytest.raises(PartitionError):
        plan_node(one, 1, mode="lwk")
    plan = plan_node(one, 1, mode="lwk", oversubscribe=True)
    assert plan.ranks[0].cpus == (3,) and plan.oversubscribed


@pytest.mark.parametrize("kwargs,match", [
    (dict(nranks=8), "--oversubscribe"),
    (dict(nranks=2, linux_cores="9"), "exceeds"),
    (dict(nranks=2, linux_cores="0"), "at least one"),
    (dict(nranks=2, linux_cores="12-13"), "not allowed"),
    (dict(nranks=2, linux_cores="0-1", lwk_cores=(1, 2)), "overlap"),
    (dict(nranks=2, lwk_cores=(2, 99)), "not allowed"),
    (dict(nranks=4, mem=8 * G), "exceeds"),
    (dict(nranks=0), "at least one rank"),
])
def test_impossible_plans(kwargs, match):
    n = kwargs.pop("nranks")
    with pytest.raises(PartitionError, match=match):
        plan_node(EIGHT, n, mode="lwk", **kwargs)


def test_linux_mode_more_ranks_than_cpus():
    with pytest.raises(PartitionError, match="8 CPUs"):
        plan_node(EIGHT, 9, mode="linux")


def test_vnode_split():
    halves = EIGHT.split(2)
    assert [h.cpus for h in halves] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert halves[1].mem_available == 8 * G
    assert plan_node(halves[1], 1, mode="lwk").linux_cpus == (4,)
    with pytest.raises(PartitionError):
        EIGHT.split(9)


def test_cgroup_v1_and_v2(tmp_path: Path):
    proc, sysfs = tmp_path / "proc", tmp_path / "cg"
    proc.mkdir()
    (proc / "cgroup").write_text("3:cpuset:/slurm/job1\n0::/\n")
    (sysfs / "cpuset" / "slurm" / "job1").mkdir(parents=True)
    (sysfs / "cpuset" / "slurm" / "job1" / "cpuset.effective_cpus").write_text("2-5\n")
    assert cgroup_cpus(proc, sysfs) == (2, 3, 4, 5)
    (proc / "cgroup").write_text("0::/system.slice/job\n")
    (sysfs / "system.slice" / "job").mkdir(parents=True)
    (sysfs / "system.slice" / "cpuset.cpus.effective").write_text("0-1\n")
    assert cgroup_cpus(proc, sysfs) == (0, 1)  # inherited from the parent cgroup


def test_slurm_bind_list():
    env = {"SLURM_CPU_BIND_LIST": "0x3,0xC", "SLURM_CPU_BIND_TYPE": "mask_cpu:"}
    assert slurm_step_cpus(env) == (0, 1, 2, 3)
    assert slurm_step_cpus({}) is None
