"""Interpreter noise controls: frozen GC, safepoints, switch interval, guarded SCHED_FIFO."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import weakref

import pytest

from mckmpi.errors import UsageError
from mckmpi.lwk.quiet import QuietState, fifo_refusal


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def _make_cycle() -> weakref.ref[_Node]:
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    return weakref.ref(a)


def test_gc_frozen_until_safepoint() -> None:
    was_enabled = gc.isenabled()
    with QuietState() as q:
        frozen = q.freeze_gc()
        assert frozen > 0 and not gc.isenabled()
        ref = _make_cycle()
        # Enough allocations of container objects to trigger every generation many times
        # over if the collector were live.
        junk = [[i] for i in range(200_000)]
        del junk
        assert ref() is not None, "a cycle was collected while the GC was frozen"
        spent = q.safepoint()
        assert ref() is None, "safepoint() did not collect the cycle"
        assert spent > 0 and not gc.isenabled()
        stats = q.stats()
        assert stats["safepoints"] == 1
        assert stats["safepoint_ns"] == spent == stats["safepoint_max_ns"]
        assert stats["safepoint_collected"] >= 2
        assert stats["gc_collect_at_exit"] is True
        assert all(isinstance(v, (int, float, str, bool)) for v in stats.values())
    assert gc.isenabled() == was_enabled
    assert gc.get_freeze_count() == 0


def test_full_safepoint_reclaims_garbage_among_frozen_objects() -> None:
    with QuietState() as q:
        q.freeze_gc()
        node = _Node()
        node.other = node
        ref = weakref.ref(node)
        q.safepoint()  # the cycle is alive here, so this freezes it
        del node
        q.safepoint()
        assert ref() is not None, "a plain safepoint must not look at frozen objects"
        q.safepoint(full=True)
        assert ref() is None


def test_exit_collection_runs_finalizers_of_frozen_garbage() -> None:
    code = (
        "import gc\n"
        "from mckmpi.lwk.quiet import freeze_gc\n"
        "class N:\n"
        "    def __del__(self): print('finalized', flush=True)\n"
        "n = N(); n.self = n\n"
        "freeze_gc()\n"
        "del n\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "finalized"


def test_switch_interval_raised_and_restored() -> None:
    before = sys.getswitchinterval()
    q = QuietState()
    q.raise_switch_interval(0.25)
    assert sys.getswitchinterval() == pytest.approx(0.25)
    stats = q.stats()
    assert stats["switch_interval_before"] == pytest.approx(before)
    assert stats["switch_interval_after"] == pytest.approx(0.25)
    q.restore()
    assert sys.getswitchinterval() == pytest.approx(before)
    with pytest.raises(UsageError):
        q.raise_switch_interval(0)


def test_fifo_refused_when_affinity_overlaps_linux_cores() -> None:
    affinity = sorted(os.sched_getaffinity(0))
    before = os.sched_getscheduler(0)
    with QuietState() as q:
        policy, reason = q.set_fifo(10, linux_cpus=[affinity[0]])
        assert policy == "SCHED_OTHER"
        assert "includes Linux cores" in reason and str(affinity[0]) in reason
        assert os.sched_getscheduler(0) == before
        assert q.stats()["policy_reason"] == reason
        with pytest.raises(UsageError):
            q.set_fifo(1000, linux_cpus=[affinity[0]])


@pytest.mark.parametrize("affinity, linux, rt, expected", [
    ({2, 3}, {0}, 950000, None),
    ({0, 1}, {1}, 950000, "includes Linux cores [1]"),
    ({2, 3}, {0}, -1, "RT throttling is off"),
    ({2, 3}, {0}, None, "cannot read"),
    ({2, 3}, set(), 950000, "no Linux cores"),
])
def test_fifo_refusal_rules(affinity: set[int], linux: set[int], rt: int | None,
                            expected: str | None) -> None:
    reason = fifo_refusal(affinity, linux, rt)
    if expected is None:
        assert reason is None
    else:
        assert reason is not None and expected in reason


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs a Linux and an LWK core")
def test_fifo_on_lwk_core_is_taken_or_explained_and_restored() -> None:
    # In a child pinned to the LWK core, so a FIFO thread never shares a core with pytest.
    linux_cpu, lwk_cpu = sorted(os.sched_getaffinity(0))[:2]
    code = (
        "import os\n"
        f"os.sched_setaffinity(0, {{{lwk_cpu}}})\n"
        "from mckmpi.lwk.quiet import QuietState\n"
        "q = QuietState()\n"
        f"policy, reason = q.set_fifo(1, linux_cpus=[{linux_cpu}])\n"
        "actual = os.sched_getscheduler(0)\n"
        "q.restore()\n"
        "print(policy, actual == os.SCHED_FIFO, os.sched_getscheduler(0) == os.SCHED_OTHER)\n"
        "print(reason)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    first, reason = out.stdout.splitlines()
    policy, was_fifo, restored = first.split()
    assert restored == "True"
    if policy == "SCHED_FIFO":
        assert was_fifo == "True" and "priority 1" in reason
    else:
        assert policy == "SCHED_OTHER" and was_fifo == "False"
        assert "sched_setscheduler" in reason or "RT throttling" in reason
