"""The noise benchmarks under the harness (FWQ, FTQ, selfish detour) and noise injection."""

from __future__ import annotations

import numpy as np
import pytest

from mckmpi.trace.reader import open_run
from test_apps import LAYOUTS, run_app

QUANTUM_US = 200


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fwq_samples_are_quanta(layout, tmp_path):
    _, out = run_app(tmp_path, layout, "fwq", "--samples", "300", "--quantum-us", str(QUANTUM_US))
    with open_run(out) as run:
        size = run.world_size
        samples = run.read("noise/fwq_ns")
        attrs = run.group_attrs("noise")
        assert run.units("noise/fwq_ns") == "ns"
    assert size == LAYOUTS[layout][0]
    assert samples.shape == (size, 300) and samples.dtype == np.int64
    q = attrs["fwq_quantum_ns"]
    assert q == QUANTUM_US * 1000
    assert attrs["fwq_reps"] * attrs["fwq_unit_ns"] >= 0.95 * q
    # Quiet samples take the quantum. A virtual CPU's speed drifts (here by up to 40 % within
    # seconds, differently per CPU), so a core faster than it was during the calibration
    # makes samples short: 99 % of them must reach 0.75 q, and none may fall below q / 2.
    assert (np.percentile(samples, 1, axis=1) >= 0.75 * q).all(), np.sort(samples)[:, :10]
    assert (samples >= 0.5 * q).all(), samples.min()
    assert np.median(samples) < 20 * q
    assert 0 < attrs["timer_cost_ns"] < 10_000 and 0 < attrs["timer_resolution_ns"] < 10_000
    assert 10_000 <= attrs["fwq_min_quantum_ns"] <= q
    assert "injected" not in attrs


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ftq_counts_on_a_uniform_grid(layout, tmp_path):
    interval = 500_000
    _, out = run_app(tmp_path, layout, "ftq", "--intervals", "400", "--interval-us", "500")
    with open_run(out) as run:
        size = run.world_size
        counts, starts = run.read("noise/ftq_counts"), run.read("noise/ftq_start_ns")
        attrs = run.group_attrs("noise")
        assert run.units("noise/ftq_start_ns") == "ns"
    assert counts.shape == starts.shape == (size, 400)
    assert counts.dtype == starts.dtype == np.int64
    assert attrs["ftq_interval_ns"] == interval
    assert (np.diff(starts, axis=1) == interval).all()
    assert np.ptp(starts[:, 0]) < 100_000  # one common start (one host: one clock)
    assert (counts >= 0).all() and (counts.sum(axis=1) > 0).all()
    # No interval holds many more units than the fastest unit allows.
    assert counts.max() <= 1.5 * interval / attrs["ftq_unit_ns"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_detour_events(layout, tmp_path):
    _, out = run_app(tmp_path, layout, "detour", "--duration-s", "0.3")
    with open_run(out) as run:
        size = run.world_size
        span = run.scalars("noise/detour_span_ns")
        threshold = run.scalars("noise/detour_threshold_ns")
        loop = run.scalars("noise/detour_min_loop_ns")
        per_rank = [run.table("noise/detours", r) for r in range(size)]
        assert run.units("noise/detours", "duration_ns") == "ns"
    assert span.shape == threshold.shape == loop.shape == (size,)
    assert (span >= 0.3e9).all() and (span < 10e9).all()
    assert ((loop > 0) & (loop < 10_000)).all() and (threshold == 5 * loop).all()
    for r, events in enumerate(per_rank):
        assert (events["rank"] == r).all()
        assert (np.diff(events["start_ns"]) > 0).all()
        assert (events["duration_ns"] > threshold[r]).all()
        assert events["duration_ns"].sum() / span[r] < 1


def test_injected_noise_lands_in_fwq_samples_of_selected_ranks(tmp_path):
    _, out = run_app(tmp_path, "2", "fwq", "--samples", "400", "--quantum-us", "1000",
                        "--inject-noise", "100:1500:1")
    with open_run(out) as run:
        samples = run.read("noise/fwq_ns")
        stolen, count = run.scalars("noise/injected_ns"), run.scalars("noise/injected_count")
        attrs = run.group_attrs("noise")
    assert attrs["injected"] == "100:1500:1" and not attrs["injected_sync"]
    assert stolen[0] == 0 and count[0] == 0
    # 100 Hz over the time rank 1 spent sampling, each detour of 1.5 ms inside one sample.
    expected = samples[1].sum() / 10_000_000
    assert 0.7 * expected - 2 <= count[1] <= 1.3 * expected + 2
    assert stolen[1] >= count[1] * 1_500_000
    hit = samples[1] >= attrs["fwq_quantum_ns"] + 1_400_000
    assert hit.sum() >= 0.8 * count[1]


def _phase(starts: np.ndarray, period: int) -> float:
    """Where in the period the injected detours start, in periods (0..1): the circular mean
    of the starts inside the densest arc of a tenth of a period. A detour that began late
    because its rank was off the CPU at the due time (another process ran there) lies
    outside that arc and cannot move the phase."""
    phase = (starts % period) / period
    counts = [np.count_nonzero((phase - centre) % 1.0 < 0.1) for centre in phase]
    centre = phase[int(np.argmax(counts))]
    inside = phase[(phase - centre) % 1.0 < 0.1]
    angle = 2 * np.pi * inside
    return float(np.arctan2(np.sin(angle).sum(), np.cos(angle).sum()) / (2 * np.pi)) % 1.0


@pytest.mark.parametrize("sync", [True, False])
def test_inject_sync_aligns_detours_across_ranks(sync, tmp_path):
    period = 20_000_000
    args = ["--duration-s", "0.6", "--inject-noise", "50:2000"] + (["--inject-sync"] if sync else [])
    _, out = run_app(tmp_path, "2", "detour", *args)
    with open_run(out) as run:
        # Injected detours last 2 ms plus a loop turn; other interruptions rarely do.
        injected = [e["start_ns"][(e["duration_ns"] >= 1_990_000) & (e["duration_ns"] < 2_200_000)]
                    for e in (run.table("noise/detours", r) for r in (0, 1))]
        assert run.group_attrs("noise")["injected_sync"] == sync
        count = run.scalars("noise/injected_count")
    assert (count >= 20).all() and all(len(s) >= 10 for s in injected)
    shift = (_phase(injected[1], period) - _phase(injected[0], period)) % 1.0
    distance = min(shift, 1.0 - shift)
    if sync:
        assert distance < 0.05
    else:  # rank r is offset by frac((r + 1) * 0.618) of a period: 0.382 between ranks 0 and 1
        assert abs(distance - 0.382) < 0.1
