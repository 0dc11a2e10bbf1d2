"""Predictions of larger study points from the smallest (mckmpi.analysis.predict)."""

from __future__ import annotations

import numpy as np
import pytest

from mckmpi.analysis import predict, study
from test_analysis import write_synthetic


def calibration(noise: np.ndarray, app: str = "cg", round_ns: float = 1000.0) -> predict.Calibration:
    halos, allreduces = predict.PATTERNS[app]
    return predict.Calibration(work_ns=100_000.0, ranks=2, noise_ns=noise, halo_ns=500.0,
                               round_ns=round_ns, ndim=3, halos=halos, allreduces=allreduces)


def test_without_noise_an_iteration_is_work_halo_and_tree_rounds():
    cal = calibration(np.zeros(10))
    for p in (1, 2, 5, 8, 64):
        expected = 100_000 + 500 + 2 * predict.rounds(p) * 1000
        assert predict.iteration_ns(cal, p, 100_000.0) == pytest.approx(expected)
    stencil = calibration(np.zeros(10), "stencil")
    assert predict.iteration_ns(stencil, 64, 100_000.0) == pytest.approx(100_500)


def test_rare_noise_costs_a_tree_collective_more_as_ranks_grow():
    noise = np.zeros(1000)
    noise[:10] = 50_000.0  # 1% of windows lose 50 us
    cal = calibration(noise)
    small, large = (predict.iteration_ns(cal, p, 100_000.0) for p in (2, 512))
    # Two ranks rarely see a detour in the median iteration; 512 ranks almost always do.
    assert small < 110_000 and large > 140_000
    # Nearest-neighbour exchange spreads noise slowly: the stencil stays well below the tree.
    stencil = calibration(noise, "stencil")
    assert predict.iteration_ns(stencil, 512, 100_000.0) < large


def test_calibration_reads_work_noise_and_message_costs():
    compute = np.array([[100, 120, 100], [110, 100, 100]], dtype=float)
    allreduce = np.array([[4000, 5000, 4000], [4000, 9000, 4000]], dtype=float)
    halo = np.array([[300, 400, 300], [300, 300, 300]], dtype=float)
    cal = predict.calibrate("cg", compute, halo, allreduce, ranks=1, ndim=3, comm_ranks=4)
    assert cal.work_ns == 100 and sorted(cal.noise_ns) == [0, 0, 0, 0, 10, 20]
    assert cal.round_ns == 4000 / (2 * 2) and cal.halo_ns == 300


def test_collect_stores_predicted_next_to_measured(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    rng = np.random.default_rng(3)
    for ranks in (1, 2, 4):
        compute = 100_000 + (rng.random((1, 50)) < 0.02) * 30_000
        write_synthetic(runs / f"cg-{ranks}.h5", world_size=ranks,
                        app_iter=compute[0] + 4000, app_compute=compute[0],
                        app_comm=np.full(50, 2000 * max(1, ranks // 2)),
                        app_attrs={"name": "cg", "scaling": "weak", "global_size": 1000 * ranks,
                                   "process_grid": "1x1x1"})
    rows = study.collect(runs).rows
    assert np.isfinite(rows["predicted_iter_us"]).all()
    err = (rows["predicted_iter_us"] - rows["iter_us"]) / rows["iter_us"]
    assert rows["prediction_error"] == pytest.approx(err)
    assert (abs(rows["prediction_error"]) < 0.2).all()


def test_simulate_models_allreduce_trees_beside_the_barrier(tmp_path):
    import json

    from fixtures import mckmpi

    rng = np.random.default_rng(5)
    fwq = 100_000 + (rng.random(16_000) < 0.01) * rng.integers(10_000, 50_000, 16_000)
    path = write_synthetic(tmp_path / "fwq.h5", fwq=fwq)
    out = mckmpi("simulate", "--from", str(path), "--ranks", "8,512", "--work-us", "100",
                 "--allreduce-round-us", "5", "--allreduces", "2", "--json")
    assert out.returncode == 0, out.stderr
    tree = {row["ranks"]: row["iteration_ns"] for row in json.loads(out.stdout)["tree"]}
    assert sorted(tree) == [1, 8, 512]
    # No noise in the median iteration of one rank: work plus nothing to wait for.
    assert tree[1] == pytest.approx(100_000, rel=0.01)
    # 2 x 9 rounds of 5 us at 512 ranks, and the noise the tree collects on the way.
    assert tree[512] > 100_000 + 2 * 9 * 5_000
    assert tree[1] < tree[8] < tree[512]
    bad = mckmpi("simulate", "--from", str(path), "--ranks", "8", "--work-us", "100",
                 "--allreduce-round-us", "0")
    assert bad.returncode == 2 and "--allreduce-round-us must be positive" in bad.stderr
