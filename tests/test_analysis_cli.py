"""The post-processing commands end to end: real runs, plots, JSON, exit codes, damaged
files, and no MPI or runtime imported by post-processing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from fixtures import ROOT, job_env, mckmpi, mpirun
from mckmpi.trace.reader import open_run
from mckmpi.trace.schema import SCHEMA_VERSION
from test_analysis import DETOUR_DTYPE, offload_calls, study_dir, write_synthetic

PROBE_APP = textwrap.dedent("""
    import numpy as np
    from mpi4py import MPI

    import mckmpi

    r = MPI.COMM_WORLD.Get_rank()
    t = mckmpi.context().tracer
    t.array("noise", "fwq_ns", 1_000_000 + np.arange(1000, dtype=np.int64) * (r + 1), units="ns")
    t.attrs("noise", fwq_quantum_ns=1_000_000, fwq_reps=3)
    det = np.zeros(r + 1, dtype=[("start_ns", "i8"), ("duration_ns", "i8")])
    det["start_ns"] = np.arange(r + 1) * 1_000_000
    det["duration_ns"] = 1000 * (r + 1)
    t.table("noise", "detours", det, units={"start_ns": "ns", "duration_ns": "ns"})
    t.scalar("noise", "detour_span_ns", 10**9, units="ns")
    t.array("app", "iter_ns", np.full(10, 100_000 * (r + 1), dtype=np.int64), units="ns")
    t.attrs("app", name="probe", scaling="strong", global_size=64, verified=True)
    t.scalar("memory", "peak", 1000 * (r + 1), units="B")
""")


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory) -> Path:
    """A real 2-rank job whose app records known data on every rank."""
    d = tmp_path_factory.mktemp("probe")
    app = d / "probe.py"
    app.write_text(PROBE_APP)
    out = d / "probe.h5"
    proc = mpirun(2, "run", "--out", str(out), "--", str(app), timeout=90)
    assert proc.returncode == 0, proc.stderr
    return out


def _json(*args: str) -> dict:
    proc = mckmpi(*args, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _one_clear_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("mckmpi: error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def _png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, path


# --- a real run ----------------------------------------------------------------------------


def test_report_of_a_real_two_rank_run(probe_run, tmp_path):
    doc = _json("report", str(probe_run), "--json", "--plots", str(tmp_path))
    fwq = doc["noise"]["fwq"]
    assert [(r["rank"], r["p50_ns"], r["p999_ns"], r["max_ns"]) for r in fwq] == [
        (0, 499, 998, 999),
        (1, 998, 1996, 1998),
    ]
    det = doc["noise"]["detours"]
    assert [(d["count"], d["total_ns"]) for d in det] == [(1, 1000), (2, 4000)]
    assert doc["app"]["iter_p50_ns"] == 200_000 and doc["app"]["name"] == "probe"
    assert doc["attrs"]["world_size"] == 2 and len(doc["ranks"]) == 2
    plots = {Path(p).name for p in doc["plots"]}
    assert plots == {
        "probe-fwq-timeline.png",
        "probe-fwq-excess.png",
        "probe-detours.png",
        "probe-iterations.png",
    }
    for p in doc["plots"]:
        _png(Path(p))


def test_tables_are_sliced_per_rank(probe_run):
    with open_run(probe_run) as run:
        assert list(run.row_offsets("noise/detours")) == [0, 1, 3]
        rows = run.table("noise/detours", 1)
        assert list(rows["rank"]) == [1, 1] and list(rows["duration_ns"]) == [2000, 2000]
        assert run.table("noise/detours", 5).size == 0
        assert list(run.scalars("memory/peak")) == [1000, 2000]
        assert run.group_attrs("app")["name"] == "probe" and run.group_attrs("nothing") == {}


def test_report_text(probe_run):
    proc = mckmpi("report", str(probe_run))
    assert proc.returncode == 0, proc.stderr
    for needle in (
        "FWQ noise",
        "selfish detours",
        "memory/peak",
        "probe   strong scaling",
        "verified True",
        "recorded data",
    ):
        assert needle in proc.stdout, needle


# --- compare, simulate, study --------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("pair")
    base = 1_000_000 + np.arange(2000, dtype=np.int64)
    noisy, quiet = base.copy(), base.copy()
    noisy[7::50] += 400_000
    quiet[7::50] += 4_000
    det = np.zeros(3, dtype=DETOUR_DTYPE)
    det["start_ns"], det["duration_ns"] = [10_000, 500_000, 900_000], [50_000, 70_000, 20_000]
    a = write_synthetic(
        d / "fwq-linux.h5",
        mode="linux",
        fwq=noisy,
        detours=det,
        span_ns=10**9,
        app_iter=np.full(20, 300_000),
        calls=offload_calls(),
    )
    det["duration_ns"] //= 10
    faster = offload_calls()
    faster["done_ns"] = faster["trap_ns"] + (faster["done_ns"] - faster["trap_ns"]) // 2
    b = write_synthetic(
        d / "fwq-lwk.h5",
        mode="lwk",
        fwq=quiet,
        detours=det,
        span_ns=10**9,
        app_iter=np.full(20, 250_000),
        calls=faster,
    )
    return a, b


def test_compare_text_json_and_plots(pair, tmp_path):
    a, b = pair
    proc = mckmpi("compare", str(a), str(b), "--plots", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "A = linux" in proc.stdout and "B = lwk" in proc.stdout
    # p99.9 of 2000 samples is the 38th of the 40 noisy ones: sample 1857, excess 400 us + 1857 ns
    assert (
        "FWQ excess p99.9, worst rank: lwk is better, 68.6x lower (linux 401.9 us, lwk 5.857 us)"
        in proc.stdout
    )
    assert (
        "of the 16 metrics with a direction: lwk better in 13, linux better in 0, equal in 3"
        in proc.stdout
    )
    # pooled offload latencies 7, 10, 20, 30, 40, 50 us (halved in B): p50 is the third
    assert "offload latency p50, all calls: lwk is better, 2x lower (linux 20 us, lwk 10 us)" in (
        proc.stdout
    )
    assert "detours noise fraction, mean of ranks: lwk is better, 10x lower" in proc.stdout
    plots = sorted(p.name for p in tmp_path.glob("*.png"))
    assert plots == [
        f"compare-fwq-linux-vs-fwq-lwk-{k}.png"
        for k in ("detours", "fwq-excess", "fwq-timeline", "iterations", "offload-latency")
    ]
    for p in tmp_path.glob("*.png"):
        _png(p)
    doc = _json("compare", str(a), str(b), "--json")
    it = next(m for m in doc["metrics"] if m["name"] == "iteration p50 (slowest rank)")
    assert it["winner"] == "b" and it["ratio_b_over_a"] == pytest.approx(250 / 300)


def test_simulate_cli(pair, tmp_path):
    a, _ = pair
    proc = mckmpi(
        "simulate",
        "--from",
        str(a),
        "--ranks",
        "1e3,1e4,1e5,1e6",
        "--work-us",
        "1000",
        "--plots",
        str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    assert "1000000" in proc.stdout and "slowdown" in proc.stdout
    _png(tmp_path / "simulate-fwq-linux.png")
    doc = _json(
        "simulate",
        "--from",
        str(a),
        "--ranks",
        "1e3",
        "--work-us",
        "1000",
        "--json",
        "--source",
        "detours",
        "--iterations",
        "500",
    )
    one, thousand = doc["predictions"]
    assert doc["source"] == "detours" and one["ranks"] == 1 and thousand["ranks"] == 1000
    assert thousand["slowdown"] > one["slowdown"] >= 1.0


def test_study_collect_and_plot(tmp_path):
    runs = study_dir(tmp_path)
    out = tmp_path / "study.h5"
    proc = mckmpi("study", "collect", str(runs), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and "7 runs, 2 files skipped" in proc.stdout
    assert "skipped" in proc.stderr and "broken.h5" in proc.stderr
    proc = mckmpi("study", "plot", str(out), "--plots", str(tmp_path / "plots"))
    assert proc.returncode == 0, proc.stderr
    plots = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert plots == [
        "scaling-cg-strong-global_size_1000.png",
        "scaling-stencil-weak-100_per_rank.png",
    ]
    for p in (tmp_path / "plots").glob("*.png"):
        _png(p)


# --- errors: one clear line, exit 2 --------------------------------------------------------


def test_damaged_and_foreign_files(pair, tmp_path):
    a, _ = pair
    cut = tmp_path / "cut.h5"
    cut.write_bytes(a.read_bytes()[: a.stat().st_size // 2])
    assert "not a readable HDF5 file" in _one_clear_line(mckmpi("report", str(cut)))
    future = tmp_path / "future.h5"
    shutil.copy(a, future)
    with h5py.File(future, "a") as f:
        f.attrs["schema_version"] = SCHEMA_VERSION + 1
    assert "newer than this mckmpi reads" in _one_clear_line(mckmpi("compare", str(a), str(future)))
    partial = tmp_path / "x.h5.partial"
    shutil.copy(a, partial)
    with h5py.File(partial, "a") as f:
        f.attrs["complete"] = False
    assert "incomplete run file" in _one_clear_line(
        mckmpi("simulate", "--from", str(partial), "--ranks", "10", "--work-us", "1")
    )


def test_corrupt_chunk_is_a_clear_error(tmp_path):
    path = write_synthetic(tmp_path / "big.h5", fwq=np.arange(400_000, dtype=np.int64) + 1)
    with h5py.File(path, "r") as f:
        info = f["noise/fwq_ns"].id.get_chunk_info(1)  # a gzip-compressed chunk
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + 16)
        fh.write(b"\xff" * 64)
    line = _one_clear_line(mckmpi("report", str(path)))
    assert "the file is damaged" in line and "noise/fwq_ns" in line


@pytest.mark.parametrize(
    "args,match",
    [
        (["simulate", "--from", "{a}", "--ranks", "1e3,many", "--work-us", "10"], "not a number"),
        (["simulate", "--from", "{a}", "--ranks", "0.5", "--work-us", "10"], "whole number"),
        (["simulate", "--from", "{a}", "--ranks", "10", "--work-us", "-3"], "must be positive"),
        (
            ["simulate", "--from", "{a}", "--ranks", "10", "--work-us", "10", "--iterations", "0"],
            "at least 1",
        ),
        (["simulate", "--from", "{a}", "--ranks", "10", "--work-us", "1e9"], "more than the"),
        (
            ["simulate", "--from", "{empty}", "--ranks", "10", "--work-us", "10"],
            "neither FWQ samples nor detour",
        ),
        (["study", "plot", "{a}", "--plots", "/tmp"], "a run file"),
        (["study", "plot", "/nonexistent/study.h5", "--plots", "/tmp"], "no such study file"),
        (["study", "collect", "{empty_dir}", "-o", "{out}"], "no complete run files"),
        (["compare", "{a}", "/nonexistent.h5"], "no such run file"),
        (["report", "{empty_dir}"], "is a directory, not a run file"),
    ],
)
def test_user_errors(pair, tmp_path, args, match):
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    values = {
        "a": str(pair[0]),
        "empty": str(write_synthetic(tmp_path / "e.h5")),
        "empty_dir": str(empty_dir),
        "out": str(tmp_path / "s.h5"),
    }
    line = _one_clear_line(mckmpi(*[a.format(**values) for a in args]))
    assert match in line


# --- post-processing stays free of MPI and the runtime -------------------------------------


ISOLATION = textwrap.dedent("""
    import contextlib, importlib, io, pkgutil, sys
    import mckmpi.analysis
    for m in pkgutil.iter_modules(mckmpi.analysis.__path__):
        importlib.import_module("mckmpi.analysis." + m.name)
    import mckmpi.trace.reader
    from mckmpi.frontend.cli import main
    a, b, plots = sys.argv[1:4]
    with contextlib.redirect_stdout(io.StringIO()):
        for argv in (["report", a, "--plots", plots], ["compare", a, b, "--plots", plots],
                     ["simulate", "--from", a, "--ranks", "1e3", "--work-us", "100",
                      "--plots", plots]):
            assert main(argv) == 0, argv
    bad = sorted(m for m in sys.modules if m == "mpi4py" or m.startswith(
        ("mpi4py.", "mckmpi.lwk", "mckmpi.offload", "mckmpi.runner", "mckmpi.trace.writer")))
    print("IMPORTED", bad)
""")


def test_post_processing_imports_no_mpi_or_runtime(pair, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", ISOLATION, str(pair[0]), str(pair[1]), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=job_env(),
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "IMPORTED []" in proc.stdout
