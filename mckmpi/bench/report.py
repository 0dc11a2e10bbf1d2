"""Benchmark: `mckmpi report` on a run file of 10^8 FWQ samples, time and peak memory.

The file is made by a real job: `mpiexec -n 4 mckmpi run -m mckmpi.bench.report` runs this
module as the app, each rank records 2.5*10^7 synthetic FWQ samples (a 1 ms quantum, small
jitter, rare detours of 10 us..5 ms) through the tracing API, and the harness writes the
run file with its normal writer (parallel HDF5 here; the gzip-compressed single-writer file
is measured too). `quick` uses 10^7 samples.

Measured, each in a fresh process (peak RSS from getrusage, wall time from outside):
- `mckmpi report FILE --plots DIR`, the full report;
- baselines in the same run: opening the file only (the memory floor of an interpreter with
  h5py and numpy), streaming every sample once and summing it (the I/O floor an exact report
  cannot beat), and the naive report that loads the whole dataset and calls numpy.percentile
  per rank (the memory a non-streaming report would need).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time

import numpy as np

from mckmpi.bench import write_result
from mckmpi.jobs.launchers import Job

RANKS = 4
QUANTUM_NS = 1_000_000
CHUNK = 1 << 22

_MEASURE = r"""
import json, resource, sys, time
t0 = time.perf_counter()
kind, path, plots = sys.argv[1], sys.argv[2], sys.argv[3]
if kind == "report":
    import contextlib, io
    from mckmpi.frontend.cli import main
    with contextlib.redirect_stdout(io.StringIO()):
        rc = main(["report", path, "--plots", plots])
    assert rc == 0
elif kind == "open":
    from mckmpi.trace.reader import open_run
    with open_run(path) as run:
        run["noise/fwq_ns"].shape
elif kind == "stream":
    from mckmpi.trace.reader import open_run
    total = 0
    with open_run(path) as run:
        for r in range(run["noise/fwq_ns"].shape[0]):
            for block in run.rank_blocks("noise/fwq_ns", r):
                total += int(block.sum())
elif kind == "naive":
    import numpy as np
    from mckmpi.trace.reader import open_run
    with open_run(path) as run:
        data = run["noise/fwq_ns"][()]
    excess = data - data.min(axis=1, keepdims=True)
    np.percentile(excess, [50, 99, 99.9, 100], axis=1)
print(json.dumps({"seconds_in_process": time.perf_counter() - t0,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def synthetic_samples(n: int, seed: int) -> np.ndarray:
    """FWQ-like samples: the quantum, 0..2 us of jitter, detours at 10^-3 (exponential,
    mean 50 us) and 10^-5 (uniform 1..5 ms) of the samples."""
    rng = np.random.default_rng(seed)
    out = np.empty(n, dtype=np.int64)
    for a in range(0, n, CHUNK):
        b = min(n, a + CHUNK)
        x = QUANTUM_NS + rng.integers(0, 2000, b - a)
        hit = np.flatnonzero(rng.random(b - a) < 1e-3)
        x[hit] += rng.exponential(50_000, hit.size).astype(np.int64)
        big = np.flatnonzero(rng.random(b - a) < 1e-5)
        x[big] += rng.integers(1_000_000, 5_000_000, big.size)
        out[a:b] = x
    return out


def _app(argv: list[str]) -> None:
    """The job's app: record synthetic samples on every rank."""
    p = argparse.ArgumentParser(prog="mckmpi.bench.report")
    p.add_argument("--samples", type=int, required=True)
    args = p.parse_args(argv)
    import mckmpi

    ctx = mckmpi.context()
    ctx.tracer.array(
        "noise", "fwq_ns", synthetic_samples(args.samples, seed=ctx.placement.rank), units="ns"
    )
    ctx.tracer.attrs("noise", fwq_quantum_ns=QUANTUM_NS, fwq_reps=1, timer_cost_ns=20)


def generate(path: pathlib.Path, samples_per_rank: int, writer: str) -> float:
    """Write the run file with a real job; returns its wall time in seconds."""
    # the write is what is timed: no catalogue step after it
    job = Job(("-m", "mckmpi.bench.report", "--samples", str(samples_per_rank)), RANKS,
              {"mode": "linux", "trace_writer": writer, "out": str(path), "catalogue": "off"},
              oversubscribe=True)
    t0 = time.perf_counter()
    proc = job.render("mpiexec").run(1800, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"generating {path} failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def _measure(kind: str, path: pathlib.Path, plots: pathlib.Path) -> dict:
    job = Job(("-c", _MEASURE, kind, str(path), str(plots)), options=None)
    t0 = time.perf_counter()
    proc = job.render("local").run(1800, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} on {path} failed:\n{proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_seconds"] = wall
    return result


def run(out_dir: pathlib.Path, quick: bool = False) -> dict:
    """Generate the files, measure report and baselines; write bench-report.json."""
    total = 10**7 if quick else 10**8
    per_rank = total // RANKS
    out_dir.mkdir(parents=True, exist_ok=True)
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench-report-", dir=out_dir))
    files: dict[str, dict] = {}
    try:
        for writer in ("parallel", "gather"):
            path = work / f"fwq-{writer}.h5"
            gen = generate(path, per_rank, writer)
            entry: dict = {
                "writer": writer,
                "generate_seconds": gen,
                "file_mib": path.stat().st_size / 2**20,
            }
            for kind in ("open", "stream", "report", "naive"):
                entry[kind] = _measure(kind, path, work / f"plots-{writer}")
            entry["ratio_report_vs_stream_time"] = (
                entry["report"]["wall_seconds"] / entry["stream"]["wall_seconds"]
            )
            entry["ratio_report_vs_naive_rss"] = (
                entry["report"]["peak_rss_mib"] / entry["naive"]["peak_rss_mib"]
            )
            entry["report_rss_above_open_mib"] = (
                entry["report"]["peak_rss_mib"] - entry["open"]["peak_rss_mib"]
            )
            files[writer] = entry
    finally:
        shutil.rmtree(work, ignore_errors=True)
    worst = max(files.values(), key=lambda e: e["report"]["wall_seconds"])
    result = {
        "benchmark": "report",
        "quick": quick,
        "samples": total,
        "ranks": RANKS,
        "command": "mckmpi report FILE --plots DIR",
        "goal": "under 20 s, memory bounded (independent of the sample count)",
        "report_seconds_worst": worst["report"]["wall_seconds"],
        "report_peak_rss_mib_worst": max(e["report"]["peak_rss_mib"] for e in files.values()),
        "dataset_mib": total * 8 / 2**20,
        "files": files,
        "cpus": sorted(os.sched_getaffinity(0)),
    }
    write_result(out_dir, "report", result)
    return result


if __name__ == "__main__":
    _app(sys.argv[1:])
