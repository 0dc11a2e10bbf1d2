"""Every benchmark runs (`--quick`) and writes its numbers next to a same-run baseline."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from fixtures import mckmpi
from mckmpi.frontend.bench import _benchmarks


@pytest.mark.parametrize("name", _benchmarks())
def test_benchmark_writes_its_numbers_with_ratios(name, tmp_path):
    proc = mckmpi("bench", name, "--quick", "--out", str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / f"bench-{name}.json").read_text())
    assert result["benchmark"] == name and result["quick"] is True
    assert "ratio" in json.dumps(result)  # measured against a baseline of the same run
    assert f"bench-{name}.json" in proc.stdout
    assert [p.name for p in tmp_path.iterdir()] == [f"bench-{name}.json"]  # scratch removed


def test_an_unknown_benchmark_is_one_clear_line(tmp_path):
    proc = mckmpi("bench", "nonsense", "--out", str(tmp_path))
    assert proc.returncode == 2 and "unknown benchmark 'nonsense'" in proc.stderr


@pytest.mark.skipif(shutil.which("cyclictest") is None, reason="rt-tests is not installed")
def test_cyclictest_reports_its_latency_on_one_cpu():
    from mckmpi.bench.noise import cyclictest

    got = cyclictest(max(os.sched_getaffinity(0)), 1.0)
    assert set(got) == {"max_us", "p99_us", "avg_us"}
    assert 0 < got["avg_us"] <= got["max_us"] and got["p99_us"] <= got["max_us"]


def test_bulk_ratios_are_taken_per_pair_of_blocks_so_the_order_cancels():
    """Whichever kind runs first in a block pays for colder caches; the order is reversed
    every block, so per block the ratios fall in two humps and only a pair is fair."""
    from mckmpi.bench.offload import _partitioned_case

    lat = np.zeros((3, 10), np.int64) + 1000
    first, second = 3.0, 1.0  # ms: the same work, first in its block or second
    got = {"lat_spinning": [lat],
           "bulk_native": [first, second] * 4, "bulk_arena": [second, first] * 4,
           "bulk_plain": [2 * first, 2 * second] * 4,
           "bulk_native_read": [first, second] * 4, "bulk_arena_read": [second * 1.25, first * 1.25] * 4,
           "bulk_native_readv": [first, second] * 4, "bulk_arena_readv": [second, first] * 4}
    bulk = _partitioned_case(got, rounds=1, n=10)["bulk_1mib"]
    assert bulk["blocks"] == 8
    assert bulk["ratio_arena_over_native"] == 1.0  # per block: 3.0 and 0.33
    assert bulk["ratio_plain_over_native"] == 0.5
    assert bulk["ratio_arena_read_over_native"] == 0.8
    assert bulk["ratio_arena_readv_over_native"] == 1.0
    assert bulk["goal_met"] and not bulk["goal_read_met"]
