"""Post-processing on run files written by the real writer: exact statistics, report,
compare, study, simulate."""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import pytest

from mckmpi.analysis import compare, scaling, simulate, study
from mckmpi.analysis.report import render_summary
from mckmpi.analysis.stats import moments, order_index, select
from mckmpi.analysis.summary import summarize
from mckmpi.trace import layout, writer
from mckmpi.trace.reader import open_run
from mckmpi.trace.schema import RANKS_DTYPE
from mckmpi.trace.tracer import Tracer

CALL_DTYPE = np.dtype(
    [
        ("call", "S16"),
        ("fd", "i4"),
        ("bytes", "i8"),
        ("result", "i8"),
        ("errno", "i4"),
        ("trap_ns", "i8"),
        ("done_ns", "i8"),
    ]
)
DETOUR_DTYPE = np.dtype([("start_ns", "i8"), ("duration_ns", "i8")])


def write_synthetic(
    path: Path,
    *,
    mode: str = "linux",
    world_size: int = 1,
    fwq=None,
    noise_attrs=None,
    detours=None,
    span_ns=None,
    calls=None,
    scalars=None,
    app_iter=None,
    app_compute=None,
    app_comm=None,
    app_attrs=None,
    wall_ns: int = 2_000_000_000,
    method: str = "gather",
    provenance=None,
) -> Path:
    """A one-process run file through the real writer (`world_size` is what the job claims,
    which lets scaling studies be built from single-process files)."""
    from mpi4py import MPI

    t = Tracer()
    row = np.zeros((), dtype=RANKS_DTYPE)
    row["host"], row["cpus"], row["linux_cpus"] = b"testhost", b"1", b"0"
    t.scalar("", "ranks", row)
    t.scalar("app", "wall_ns", wall_ns, units="ns")
    if fwq is not None:
        t.array("noise", "fwq_ns", np.asarray(fwq, dtype=np.int64), units="ns")
    if noise_attrs:
        t.attrs("noise", **noise_attrs)
    if detours is not None:
        t.table("noise", "detours", detours, units={"start_ns": "ns", "duration_ns": "ns"})
    if span_ns is not None:
        t.scalar("noise", "detour_span_ns", span_ns, units="ns")
        t.scalar("noise", "detour_threshold_ns", 500, units="ns")
    if calls is not None:
        t.table("offload", "calls", calls)
    for key, value in (scalars or {}).items():
        group, name = key.split("/")
        t.scalar(group, name, value)
    for name, values in (("iter_ns", app_iter), ("compute_ns", app_compute), ("comm_ns", app_comm)):
        if values is not None:
            t.array("app", name, np.asarray(values, dtype=np.int64), units="ns")
    if app_attrs:
        t.attrs("app", **app_attrs)
    root = {
        "mode": mode,
        "world_size": world_size,
        "nnodes": 1,
        "app": "apps/synthetic.py",
        "app_args": "",
        "created": "2026-01-01T00:00:00",
        "launcher": "singleton",
        "slurm_job_id": "",
    }
    return writer.write_run(MPI.COMM_SELF, path, t, root, {"python": "3", **(provenance or {})},
                            method=method)


# --- exact order statistics ----------------------------------------------------------------


def test_order_index_takes_quantiles_as_written():
    assert order_index(0.999, 1000) == 998  # not 999, as 0.999 * 1000 in floating point
    assert order_index(0.5, 1000) == 499 and order_index(1.0, 7) == 6 and order_index(0.0, 7) == 0


@pytest.mark.parametrize("bits", [None, 3, 12])
@pytest.mark.parametrize("scale", [5.0, 1e4, 1e12])
def test_select_matches_sorting(bits, scale):
    rng = np.random.default_rng(7)
    x = (rng.exponential(scale, 20_011)).astype(np.int64) - 3
    blocks = lambda: (x[i : i + 997] for i in range(0, x.size, 997))  # noqa: E731
    m = moments(blocks())
    idx = [order_index(q, x.size) for q in (0.0, 0.5, 0.99, 0.999, 1.0)]
    values, hist = select(blocks, m, idx, bits=bits)
    assert values == [int(v) for v in np.sort(x)[idx]]
    assert hist.counts.sum() == x.size and hist.log_binned().sum() == x.size


def test_select_constant_samples():
    x = np.full(10, 42)
    m = moments([x])
    assert select(lambda: [x], m, [0, 9])[0] == [42, 42]


# --- report statistics ---------------------------------------------------------------------


def offload_calls() -> np.ndarray:
    rows = np.zeros(6, dtype=CALL_DTYPE)
    rows["call"] = [b"read", b"read", b"read", b"write", b"openat", b"read"]
    rows["bytes"] = [100, 200, 300, 4096, 0, 0]
    rows["errno"] = [0, 0, 0, 0, 2, 0]
    rows["trap_ns"] = [0, 1000, 2000, 3000, 4000, 5000]
    rows["done_ns"] = rows["trap_ns"] + [10_000, 20_000, 30_000, 50_000, 7_000, 40_000]
    return rows


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    rng = np.random.default_rng(3)
    fwq = (
        1_000_000 + rng.permutation(np.arange(1000, dtype=np.int64)) * 10
    )  # excess 0, 10, .., 9990
    det = np.zeros(4, dtype=DETOUR_DTYPE)
    det["start_ns"] = [50_000, 100_000, 300_000, 900_000]
    det["duration_ns"] = [1_000, 2_000, 4_000, 8_000]
    iters = np.array([100_000, 120_000, 110_000, 400_000])
    return write_synthetic(
        tmp_path_factory.mktemp("runs") / "full.h5",
        fwq=fwq,
        noise_attrs={"fwq_quantum_ns": 1_000_000, "fwq_reps": 7, "timer_cost_ns": 25},
        detours=det,
        span_ns=1_000_000_000,
        calls=offload_calls(),
        scalars={"memory/peak": 4096, "memory/fallbacks": 0, "scheduler/policy": "fifo"},
        app_iter=iters,
        app_compute=iters // 2,
        app_comm=iters // 4,
        app_attrs={"name": "stencil", "scaling": "weak", "global_size": 4096, "verified": True},
    )


def test_fwq_statistics_are_exact(full_run):
    with open_run(full_run) as run:
        small = summarize(run, block=64)  # streamed in 16 blocks, several radix passes
        whole = summarize(run)
    for s in (small, whole):
        (r,) = s.fwq
        assert (r.samples, r.quantum_ns) == (1000, 1_000_000)
        assert (r.p50_ns, r.p99_ns, r.p999_ns, r.max_ns) == (4990, 9890, 9980, 9990)
        assert r.mean_ns == pytest.approx(4995)
        assert r.noise_fraction == pytest.approx(4_995_000 / (1000 * 1_000_000 + 4_995_000))
        assert r.histogram.sum() == 1000
    env = small.fwq[0].envelope
    assert env.time_s.size == 1000 and env.high_ns.max() == 1_009_990
    assert env.time_s[-1] == pytest.approx(whole.fwq[0].envelope.time_s[-1])


def test_detour_offload_counter_and_app_statistics(full_run):
    with open_run(full_run) as run:
        s = summarize(run)
    (d,) = s.detours
    assert (d.count, d.total_ns, d.span_ns) == (4, 15_000, 1_000_000_000)
    assert d.fraction == pytest.approx(15e-6) and d.rate_hz == pytest.approx(4.0)
    assert (d.p50_ns, d.max_ns, d.threshold_ns) == (2_000, 8_000, 500)
    by_call = {c.call: c for c in s.calls}
    assert [c.call for c in s.calls] == ["read", "openat", "write"]  # most frequent first
    read = by_call["read"]
    assert (read.count, read.bytes, read.errors) == (4, 600, 0)
    assert (read.p50_ns, read.p99_ns, read.max_ns) == (20_000, 40_000, 40_000)
    assert by_call["openat"].errors == 1 and by_call["write"].bytes == 4096
    counters = {c.key: c for c in s.counters}
    assert counters["memory/peak"].maximum == 4096 and counters["scheduler/policy"].values == "fifo"
    a = s.app
    assert (a.name, a.scaling, a.global_size, a.verified, a.iterations) == (
        "stencil",
        "weak",
        4096,
        True,
        4,
    )
    assert (a.iter_p50_ns, a.iter_max_ns, a.wall_ns) == (110_000, 400_000, 2_000_000_000)
    assert a.compute_share == pytest.approx(0.5) and a.comm_share == pytest.approx(0.25)


def test_report_text_shows_every_section(full_run):
    with open_run(full_run) as run:
        out = render_summary(summarize(run))
    for needle in (
        "FWQ noise",
        "9.98",
        "selfish detours",
        "offloaded system calls (6)",
        "openat",
        "memory/peak",
        "scheduler/policy",
        "stencil",
        "weak scaling",
        "p50 110 us",
        "target quantum 1000 us",
        "timer cost 25 ns",
    ):
        assert needle in out, needle


def test_report_of_a_file_with_only_ranks(tmp_path):
    path = write_synthetic(tmp_path / "bare.h5")
    with open_run(path) as run:
        s = summarize(run)
    assert not s.fwq and not s.detours and not s.calls and not s.counters
    out = render_summary(s)
    assert "FWQ" not in out and "offloaded" not in out and "wall time  2 s" in out


def test_chunked_writer_round_trip_in_small_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(layout, "WRITE_BLOCK", 4096)
    data = np.arange(300_000, dtype=np.int64)  # 2.4 MB: chunked, many write calls
    path = write_synthetic(tmp_path / "c.h5", fwq=data + 1, method="parallel")
    with open_run(path) as run:
        ds = run["noise/fwq_ns"]
        assert ds.chunks == (1, layout.CHUNK_BYTES // 8)
        blocks = list(run.rank_blocks("noise/fwq_ns", 0, block=200_000))
        assert [b.size for b in blocks] == [131_072, 131_072, 37_856]
        assert np.array_equal(np.concatenate(blocks), data + 1)


# --- compare -------------------------------------------------------------------------------


def test_compare_says_who_wins_and_by_how_much(tmp_path):
    base = 1_000_000 + np.arange(1000, dtype=np.int64)
    noisy = base.copy()
    noisy[50::100] += 50_000  # 10 samples with 50 us of noise
    quiet = base.copy()
    quiet[50::100] += 5_000
    a = write_synthetic(tmp_path / "lin.h5", mode="linux", fwq=noisy)
    b = write_synthetic(tmp_path / "lwk.h5", mode="lwk", fwq=quiet, wall_ns=1_000_000_000)
    with open_run(a) as ra, open_run(b) as rb:
        sa, sb = summarize(ra), summarize(rb)
    metrics = {(m.section, m.name): m for m in compare.metrics(sa, sb)}
    p999 = metrics[("FWQ", "excess p99.9, worst rank")]
    # sorted excess: 990 quiet samples, then the noisy ones 50 us + 50, 150, ..; p99.9 is the 9th
    assert (p999.a, p999.b) == (pytest.approx(50.85), pytest.approx(5.85))
    assert p999.winner() == 1 and p999.ratio == pytest.approx(5.85 / 50.85)
    wall = metrics[("app", "wall time, slowest rank")]
    assert wall.factor() == pytest.approx(2.0) and wall.winner() == 1
    out = compare.text(sa, sb)
    assert (
        "FWQ excess p99.9, worst rank: lwk is better, 8.69x lower (linux 50.85 us, lwk 5.85 us)"
        in out
    )
    assert "lwk 8.69x lower" in out and "lwk/linux" in out


def test_compare_labels_fall_back_to_file_names(tmp_path):
    a = write_synthetic(tmp_path / "one.h5")
    b = write_synthetic(tmp_path / "two.h5")
    with open_run(a) as ra, open_run(b) as rb:
        sa, sb = summarize(ra), summarize(rb)
    assert compare.labels(sa, sb) == ("one", "two")
    assert "wall time, slowest rank: the same in both" in compare.text(sa, sb)


# --- study ---------------------------------------------------------------------------------


def study_dir(root: Path) -> Path:
    runs = root / "runs"
    runs.mkdir()
    for ranks, t in ((1, 100_000), (2, 50_000), (4, 30_000)):
        write_synthetic(
            runs / f"strong-{ranks}.h5",
            world_size=ranks,
            app_iter=[t] * 5,
            app_attrs={"name": "cg", "scaling": "strong", "global_size": 1000},
        )
    write_synthetic(
        runs / "strong-4-repeat.h5",
        world_size=4,
        app_iter=[34_000] * 5,
        app_attrs={"name": "cg", "scaling": "strong", "global_size": 1000},
    )
    for ranks, t in ((1, 100_000), (2, 110_000), (4, 125_000)):
        write_synthetic(
            runs / f"weak-{ranks}.h5",
            world_size=ranks,
            mode="lwk",
            app_iter=[t] * 5,
            app_attrs={"name": "stencil", "scaling": "weak", "global_size": 100 * ranks},
        )
    (runs / "broken.h5").write_bytes(b"not hdf5")
    with h5py.File(runs / "other.h5", "w") as f:
        f.attrs["schema"] = "something.else"
    return runs


def test_study_collect_computes_speedup_and_efficiency(tmp_path):
    collected = study.collect(study_dir(tmp_path))
    assert sorted(p.name for p, _ in collected.skipped) == ["broken.h5", "other.h5"]
    rows = {r["path"].decode(): r for r in collected.rows}
    assert len(rows) == 7
    s2, s4 = rows["strong-2.h5"], rows["strong-4.h5"]
    assert s2["speedup"] == pytest.approx(2.0) and s2["efficiency"] == pytest.approx(1.0)
    # the 4-rank point is the median of 30 and 34 us: speedup 100/32
    curve = next(c for c in scaling.curves(collected.rows) if c.app == "cg")
    assert list(curve.ranks) == [1, 2, 4] and list(curve.runs) == [1, 1, 2]
    assert curve.speedup[-1] == pytest.approx(100 / 32) and curve.efficiency[-1] == pytest.approx(
        100 / 128
    )
    assert s4["speedup"] == pytest.approx(100 / 30) and s4["baseline_ranks"] == 1
    w4 = rows["weak-4.h5"]
    assert w4["efficiency"] == pytest.approx(0.8) and w4["speedup"] == pytest.approx(3.2)
    assert (w4["app"], w4["mode"], w4["ranks"], w4["iter_us"]) == (
        b"stencil",
        b"lwk",
        4,
        pytest.approx(125.0),
    )


def test_study_file_round_trip_and_refusals(tmp_path):
    collected = study.collect(study_dir(tmp_path))
    path = study.write(collected.rows, tmp_path / "study.h5", source="x")
    rows = study.read(path)
    assert rows.dtype == study.STUDY_DTYPE
    for name in rows.dtype.names:
        np.testing.assert_array_equal(rows[name], collected.rows[name])  # NaN == NaN here
    assert "cg" in study.text(rows) and "7 runs" in study.text(rows)
    with h5py.File(path, "a") as f:
        f.attrs["schema_version"] = study.STUDY_VERSION + 1
    with pytest.raises(study.StudyFileError, match="newer"):
        study.read(path)
    with pytest.raises(study.StudyFileError, match="a run file"):
        study.read(next((tmp_path / "runs").glob("strong-1.h5")))


def test_study_of_an_empty_directory_is_a_clear_error(tmp_path):
    from mckmpi.errors import UsageError

    with pytest.raises(UsageError, match="no complete run files"):
        study.collect(tmp_path)


# --- simulate ------------------------------------------------------------------------------


def test_expected_max_is_exact_for_a_two_point_distribution():
    dist = simulate.NoiseDistribution.from_samples(np.array([0] * 90 + [10] * 10), "fwq", 100.0, 1)
    for p in (1, 5, 1000):
        assert dist.expected_max(p) == pytest.approx(10 * (1 - 0.9**p))
    draws = dist.draw_max(20, 200_000, np.random.default_rng(1))
    assert draws.mean() == pytest.approx(10 * (1 - 0.9**20), rel=0.01)


@pytest.fixture(scope="module")
def exponential_run(tmp_path_factory) -> Path:
    rng = np.random.default_rng(11)
    noise = np.rint(rng.exponential(10_000, 2_000_000)).astype(np.int64)  # mean 10 us
    return write_synthetic(tmp_path_factory.mktemp("exp") / "exp.h5", fwq=(100_000 + noise))


def test_simulate_matches_the_analytic_maximum_of_exponential_noise(exponential_run):
    with open_run(exponential_run) as run:
        dist = simulate.load(run, 100_000)
    assert dist.window_ns == 100_000 and dist.count == 2_000_000
    sim = simulate.simulate(dist, [10, 100, 1000], iterations=20_000, seed=5)
    for p in sim.predictions:
        analytic = 10_000 * sum(
            1 / i for i in range(1, p.ranks + 1)
        )  # E[max of P Exp] = mean * H_P
        assert p.expected_max_ns == pytest.approx(analytic, rel=0.02)
        assert p.mc_mean_max_ns == pytest.approx(analytic, rel=0.02)
        assert p.slowdown == pytest.approx(1 + p.expected_max_ns / 100_000)
    assert [p.ranks for p in sim.predictions] == [1, 10, 100, 1000]
    assert sim.predictions[0].amplification == pytest.approx(1.0)


def test_simulate_fwq_windows_sum_consecutive_excesses(tmp_path):
    samples = np.array([1000, 1010, 1000, 1100, 1000, 1000, 1030], dtype=np.int64)
    path = write_synthetic(tmp_path / "w.h5", fwq=samples)
    with open_run(path) as run:
        dist = simulate.from_fwq(run, 2000, block=3)  # 2 quanta; blocks split the windows
    assert dist.window_ns == 2000
    expected = np.sort([10, 10, 100, 100, 0, 30])
    got = np.repeat(dist.values, np.diff(dist.cumulative, prepend=0))
    assert list(got) == list(expected)


def test_detour_delays_follow_the_free_time():
    starts, durations = np.array([500]), np.array([100])
    # span 1000, work 100: starts at 400..500 lose the whole detour, inside it lose the rest
    delays = simulate.detour_delays(starts, durations, 1000, 100, windows=9000)
    assert delays.size == 9000
    assert delays.max() == 100 and delays.mean() == pytest.approx(15_000 / 900, rel=0.01)
    # overlapping detours merge into one busy interval
    merged = simulate.detour_delays(np.array([500, 550]), np.array([100, 100]), 1000, 100, 9000)
    assert merged.max() == 150


def test_simulate_from_detours(full_run):
    with open_run(full_run) as run:
        dist = simulate.load(run, 10_000, source="detours")
    assert dist.source == "detours" and dist.values.max() == 8_000
    # a window starting up to W before a detour loses all of it, one starting inside the rest:
    # E[delay] = sum(W d + d^2 / 2) / (span - W)
    expected = sum(10_000 * d + d * d / 2 for d in (1_000, 2_000, 4_000, 8_000)) / (1e9 - 10_000)
    assert dist.mean() == pytest.approx(expected, rel=0.02)


def test_parse_ranks():
    assert simulate.parse_ranks("1e3, 1e4,5") == [1000, 10000, 5]
    from mckmpi.errors import UsageError

    for bad in ("1e3,x", "0", "1.5", "-4"):
        with pytest.raises(UsageError):
            simulate.parse_ranks(bad)


def test_no_nan_leaks_into_json(full_run):
    import json

    from mckmpi.analysis.summary import plain

    with open_run(full_run) as run:
        text = json.dumps(plain(summarize(run).to_json()), allow_nan=False)
    assert '"p999_ns": 9980' in text
    assert not math.isnan(json.loads(text)["noise"]["fwq"][0]["noise_fraction"])
