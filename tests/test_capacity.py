"""Sizing a node's Linux cores from the proxy's measured cost per call."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fixtures import mckmpi

from mckmpi.analysis.capacity import (
    CapacityError,
    measured_cost,
    project,
    reference_dir,
)


def test_a_core_serves_its_share_and_a_node_gets_the_fewest_linux_cores():
    p = project(5000, 64, 10.0)  # 10 us a call, 70 % busy: 70 000 calls/s per core
    assert p.calls_per_core == pytest.approx(70_000)
    assert p.ranks_per_core == 14
    assert p.linux_cores == 5 and p.ranks == 59
    assert (64 - 5) * 5000 <= 5 * p.calls_per_core  # 5 serve the other 59
    assert (64 - 4) * 5000 > 4 * p.calls_per_core   # 4 would not


def test_a_rate_no_split_can_serve_says_so():
    p = project(1e6, 4, 10.0)
    assert p.linux_cores == 0 and p.ranks == 0 and p.ranks_per_core == 0


@pytest.mark.parametrize("rate, cores", [(0, 8), (-1, 8), (100, 1)])
def test_nonsense_is_refused(rate, cores):
    with pytest.raises(CapacityError):
        project(rate, cores, 10.0)


def _bench(directory: Path, cost: float) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "bench-offload.json").write_text(
        json.dumps({"capacity": {"proxy_cpu_per_call_us": cost}}))


def test_the_last_measurement_wins_over_the_reference(tmp_path: Path):
    _bench(tmp_path / "ref", 20.0)
    assert measured_cost(tmp_path / "none", tmp_path / "ref")[1:] == (
        tmp_path / "ref" / "bench-offload.json", "reference")
    _bench(tmp_path / "last", 8.0)
    cost, _, origin = measured_cost(tmp_path / "last", tmp_path / "ref")
    assert (cost, origin) == (8.0, "last measured")
    with pytest.raises(CapacityError, match="mckmpi bench offload"):
        measured_cost(tmp_path / "none", tmp_path / "none")


def test_the_shipped_reference_numbers_hold_a_capacity_measurement():
    assert measured_cost(Path("/nonexistent"))[2] == "reference"
    assert (reference_dir() / "bench-offload.json").is_file()


def test_info_offload_load_prints_the_projection(tmp_path: Path):
    _bench(tmp_path, 10.0)
    proc = mckmpi("info", "--offload-load", "5000", "--cores", "64", "--results", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "14 ranks of 5000 calls/s" in proc.stdout
    assert "--linux-cores 5" in proc.stdout and "last measured" in proc.stdout
    proc = mckmpi("info", "--offload-load", "5000", "--results", str(tmp_path / "none"), "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["origin"] == "reference"
    proc = mckmpi("info", "--offload-load", "-3", "--results", str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.startswith("mckmpi: error: ")
    assert proc.stderr.count("\n") == 1
