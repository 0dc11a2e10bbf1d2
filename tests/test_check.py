"""Repeats (median, 95% interval), one common scaling baseline, and reference gates."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from fixtures import mckmpi
from mckmpi.analysis import check, repeats, scaling, study
from test_analysis import write_synthetic

CG = {"name": "cg", "scaling": "strong", "global_size": 1000, "verified": True}


def test_t_quantiles_and_the_interval():
    assert repeats.t975(1) == 12.706 and repeats.t975(30) == 2.042
    assert repeats.t975(31) == pytest.approx(2.040, abs=2e-3)
    assert repeats.t975(200) == pytest.approx(1.972, abs=2e-3)
    iv = repeats.interval([1.0, 2.0, 3.0, math.nan])
    assert (iv.n, iv.median, iv.mean) == (3, 2.0, 2.0)
    assert iv.half_width == pytest.approx(4.303 / math.sqrt(3))
    one = repeats.interval([5.0])
    assert one.n == 1 and one.median == 5.0 and math.isnan(one.low)
    assert repeats.interval([]).n == 0


def repeated_study(root: Path, lwk_us: tuple[float, ...] = (80, 81, 82)) -> Path:
    """Point cg-linux-n1 (1 rank) and cg-linux-n2 / cg-lwk-n2 (2 ranks), 3 repeats each."""
    runs = root / "runs"
    runs.mkdir(parents=True)
    series = {("linux", 1): (200, 202, 204), ("linux", 2): (100, 101, 102), ("lwk", 2): lwk_us}
    for (mode, ranks), times in series.items():
        for k, us in enumerate(times):
            write_synthetic(runs / f"{mode}-{ranks}-{k}.h5", mode=mode, world_size=ranks,
                            app_iter=[int(us * 1000)] * 5, app_attrs=CG,
                            provenance={"study_point": f"cg-{mode}-n{ranks}",
                                        "study_repeat": str(k), "node_hostname": ["box"],
                                        "slurm_cluster": "mckmpi", "source_commit": "abc"})
    return runs


def test_collect_gives_each_point_its_median_and_interval(tmp_path):
    rows = study.collect(repeated_study(tmp_path)).rows
    assert sorted(set(rows["repeat"])) == [0, 1, 2]
    assert {r["host"] for r in rows} == {b"box"} and {r["cluster"] for r in rows} == {b"mckmpi"}
    pts = study.points(rows)
    it = {p["point"].decode(): p for p in pts[pts["metric"] == b"iter_us"]}
    assert it["cg-linux-n2"]["n"] == 3 and it["cg-linux-n2"]["median"] == pytest.approx(101)
    assert it["cg-linux-n2"]["ci_low"] == pytest.approx(101 - 4.303 / math.sqrt(3))
    # One baseline for both modes: linux mode's fewest ranks (202 us at 1 rank).
    lwk = rows[rows["mode"] == b"lwk"]
    assert set(lwk["baseline_mode"]) == {b"linux"} and set(lwk["baseline_ranks"]) == {1}
    assert np.median(lwk["speedup"]) == pytest.approx(202 / 81)
    (curve,) = [c for c in scaling.curves(rows) if c.mode == "lwk"]
    assert curve.ci_low_s[0] < curve.time_s[0] < curve.ci_high_s[0]
    path = study.write(rows, tmp_path / "study.h5", source="x")
    assert len(study.read_points(path)) == len(pts)


REFERENCE = """
system = "mckmpi"
app = "cg"
[all]
verified = {{ value = 1, tolerance = 0 }}
[points."cg-lwk-n2"]
iter_us = {{ value = {value}, lower = -0.5, upper = 0.05, unit = "us" }}
"""


def write_reference(path: Path, value: float, extra: str = "") -> Path:
    path.write_text(REFERENCE.format(value=value) + extra)
    return path


def test_check_passes_fails_and_tells_noise_from_regression(tmp_path):
    rows = study.collect(repeated_study(tmp_path)).rows
    ok = check.check(rows, check.load_reference(write_reference(tmp_path / "ok.toml", 80)))
    assert {v.status for v in ok if v.metric == "iter_us"} == {check.PASS}
    # A reference of 70 us: the median 81 and its whole interval lie above 73.5.
    bad = check.check(rows, check.load_reference(write_reference(tmp_path / "bad.toml", 70)))
    assert [v.status for v in bad if v.metric == "iter_us"] == [check.FAIL]
    assert check.failed(bad)
    # Widely spread repeats: the median is out of the band, the interval reaches into it.
    noisy = study.collect(repeated_study(tmp_path / "noisy", (60, 81, 100))).rows
    ref = check.load_reference(write_reference(tmp_path / "n.toml", 70))
    assert [v.status for v in check.check(noisy, ref) if v.metric == "iter_us"] == [check.NOISE]
    # A point the reference names but nothing ran fails.
    gone = check.load_reference(write_reference(
        tmp_path / "gone.toml", 80, '[points."cg-lwk-n8"]\nwall_s = { value = 1, tolerance = 1 }\n'))
    missing = [v for v in check.check(rows, gone) if v.point == "cg-lwk-n8"]
    assert [v.status for v in missing] == [check.MISSING, check.MISSING]


@pytest.mark.parametrize("text, message", [
    ("app = 'cg'\n", "no reference values"),
    ("[all]\nbogus = { value = 1 }\n", "unknown metric 'bogus'"),
    ("[all]\niter_us = 5\n", "want a table with a value"),
    ("[all]\niter_us = { value = 1, lower = 0.1 }\n", "lower must be <= 0"),
    ("[all\n", "not valid TOML"),
    ("colour = 1\n[all]\niter_us = { value = 1 }\n", "unknown keys ['colour']"),
])
def test_bad_reference_files_are_one_clear_line(tmp_path, text, message):
    path = tmp_path / "ref.toml"
    path.write_text(text)
    with pytest.raises(check.ReferenceError, match=message.replace("[", r"\[")):
        check.load_reference(path)


def test_check_command_exit_status_for_run_study_and_directory(tmp_path):
    runs = repeated_study(tmp_path)
    path = study.write(study.collect(runs).rows, tmp_path / "study.h5", source=str(runs))
    good, bad = write_reference(tmp_path / "ok.toml", 80), write_reference(tmp_path / "bad.toml", 70)
    for target in (runs, path):
        passed = mckmpi("check", str(target), "--reference", str(good))
        assert passed.returncode == 0, passed.stdout + passed.stderr
        assert "pass" in passed.stdout and "student-t" in passed.stdout
        failed = mckmpi("check", str(target), "--reference", str(bad))
        assert failed.returncode == 1 and "FAIL" in failed.stdout
        assert "1 fail: cg-lwk-n2 iter_us" in failed.stdout
    one = mckmpi("check", str(runs / "lwk-2-0.h5"), "--reference", str(bad), "--json")
    verdicts = json.loads(one.stdout)["verdicts"]
    assert one.returncode == 1 and {v["status"] for v in verdicts} == {"pass", "FAIL"}
    other = tmp_path / "other.toml"
    other.write_text('system = "daint"\n[all]\nwall_s = { value = 1 }\n')
    wrong = mckmpi("check", str(path), "--reference", str(other))
    assert wrong.returncode == 2 and "reference for system daint" in wrong.stderr
    assert wrong.stderr.count("\n") == 1


def test_study_plot_draws_scaling_and_the_noise_survey(tmp_path):
    runs = repeated_study(tmp_path)
    rng = np.random.default_rng(1)
    for mode, scale in (("linux", 50_000), ("lwk", 2_000)):
        for nodes in (1, 2):
            samples = 1_000_000 + rng.exponential(scale, size=(2 * nodes, 2000)).astype(np.int64)
            path = write_synthetic(runs / f"fwq-{mode}-{nodes}.h5", mode=mode,
                                   world_size=2 * nodes, fwq=samples[0],
                                   provenance={"node_name": ["n1"], "node_hostname": ["box"],
                                               "source_commit": "abc"})
            assert path.is_file()
    path = study.write(study.collect(runs).rows, tmp_path / "study.h5", source=str(runs))
    out = mckmpi("study", "plot", str(path), "--plots", str(tmp_path / "plots"))
    assert out.returncode == 0, out.stderr
    names = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert names == ["scaling-cg-strong-global_size_1000.png", "survey-synthetic.png"]
    assert "plot " in out.stdout
    from mckmpi.analysis.plots import stamp

    assert stamp(["box", "box"], ["2026-01-01T00:00", "2026-01-03T00:00"], ["abcdef0123456"]) == \
        "host box; 2026-01-01..2026-01-03; commit abcdef0123"
