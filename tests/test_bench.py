"""Every benchmark runs (`--quick`) and writes its numbers next to a same-run baseline."""

from __future__ import annotations

import json
import os
import shutil

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
