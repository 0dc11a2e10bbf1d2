"""Benchmark: `mckmpi simulate` at 10^6 ranks x 10^4 iterations, against per-rank simulation.

The noise comes from a real run file: a 4-rank job records 2.5*10^5 synthetic FWQ samples
per rank (`mckmpi.bench.report`'s generator: 1 ms quantum, jitter, rare detours), 10^6
noise windows in all (`quick`: 10^5). Measured:
- the whole command, `mckmpi simulate --from FILE --ranks 1e3,1e4,1e5,1e6 --work-us 1000
  --iterations 10000`, in a fresh process (start-up and trace loading included);
- the library call for the 10^6-rank point alone (median of repeats);
- the baseline, in the same run: simulating every rank (10^6 draws per iteration, max),
  timed over a few iterations and extrapolated to 10^4; its mean maximum is checked against
  the exact expectation.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import statistics
import tempfile
import time

import numpy as np

from mckmpi.bench import write_result
from mckmpi.analysis import simulate
from mckmpi.bench.report import generate
from mckmpi.jobs.launchers import Job
from mckmpi.trace.reader import open_run

RANKS = 10**6
ITERATIONS = 10**4
WORK_US = 1000.0


def _per_rank(
    dist: simulate.NoiseDistribution, ranks: int, iterations: int, rng: np.random.Generator
) -> np.ndarray:
    """The baseline: draw every rank's noise, keep each iteration's maximum."""
    out = np.empty(iterations)
    for i in range(iterations):
        k = rng.integers(1, dist.count + 1, ranks)
        out[i] = dist.values[np.searchsorted(dist.cumulative, k, side="left")].max()
    return out


def run(out_dir: pathlib.Path, quick: bool = False) -> dict:
    """Measure the command, the library call and the per-rank baseline; write
    bench-simulate.json."""
    samples_per_rank = 25_000 if quick else 250_000
    baseline_iterations = 3 if quick else 20
    out_dir.mkdir(parents=True, exist_ok=True)
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench-simulate-", dir=out_dir))
    try:
        path = work / "noise.h5"
        generate(path, samples_per_rank, "parallel")
        args = ["simulate", "--from", str(path), "--ranks", "1e3,1e4,1e5,1e6",
                "--work-us", str(WORK_US), "--iterations", str(ITERATIONS), "--json"]
        t0 = time.perf_counter()
        proc = Job(("-m", "mckmpi", *args), options=None).render("local").run(
            600, capture_output=True, text=True)
        command_s = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"mckmpi simulate failed:\n{proc.stderr[-2000:]}")
        predictions = json.loads(proc.stdout)["predictions"]
        with open_run(path) as r:
            t0 = time.perf_counter()
            dist = simulate.load(r, WORK_US * 1e3)
            load_s = time.perf_counter() - t0
        library = []
        for seed in range(5):
            t0 = time.perf_counter()
            sim = simulate.simulate(dist, [RANKS], ITERATIONS, seed=seed)
            library.append(time.perf_counter() - t0)
        exact = sim.predictions[-1].expected_max_ns
        t0 = time.perf_counter()
        brute = _per_rank(dist, RANKS, baseline_iterations, np.random.default_rng(1))
        per_iteration = (time.perf_counter() - t0) / baseline_iterations
    finally:
        shutil.rmtree(work, ignore_errors=True)
    baseline_s = per_iteration * ITERATIONS
    library_s = statistics.median(library)
    result = {
        "benchmark": "simulate",
        "quick": quick,
        "ranks": RANKS,
        "iterations": ITERATIONS,
        "noise_windows": dist.count,
        "goal": "10^6 ranks x 10^4 iterations under 2 s",
        "command": " ".join(["mckmpi", *args]).replace(str(path), "FILE"),
        "command_seconds": command_s,
        "trace_load_seconds": load_s,
        "library_seconds_1e6_ranks": library_s,
        "library_seconds_samples": library,
        "baseline_per_rank_seconds_per_iteration": per_iteration,
        "baseline_per_rank_seconds_extrapolated": baseline_s,
        "baseline_iterations_measured": baseline_iterations,
        "ratio_baseline_vs_library": baseline_s / library_s,
        "exact_expected_max_ns": exact,
        "baseline_mean_max_ns": float(brute.mean()),
        "predictions": predictions,
        "cpus": sorted(os.sched_getaffinity(0)),
    }
    write_result(out_dir, "simulate", result)
    return result
