"""Benchmark: what the harness costs the measured work, under `mckmpi run` vs bare.

apps/fwq.py runs as a 2-rank job three times per round, rotating, in the same benchmark run:
under the harness (`mckmpi run --mode linux`, tracing on: the samples stream into the run
file's spool every second), under the harness with streaming off (`--trace-flush 0`: the
run file is written at the end only) and bare (`mpiexec python apps/fwq.py`, the tracer
keeps nothing). Compared: rank 0's median FWQ sample, and the median per kernel repetition
(median / calibrated repetitions), which removes the run-to-run spread of the calibration,
and each round's pair. Goals: the traced median within 1% of the bare one, and the streamed
within 1% of the unstreamed (what streaming costs); the spread of each side over its rounds says how much of
a difference this host can resolve. Every run's median comes from the app's own summary
line; the traced runs' run files are checked to hold the samples.

The stencil runs the same way (2 ranks, weak scaling, 256x256 per rank): its median
per-iteration time on rank 0 under `mckmpi run --mode linux` against bare. Goal: <= 1.02x.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import statistics
import tempfile

from mckmpi.bench import write_result
from mckmpi.demo import app_path
from mckmpi.jobs.launchers import Job
from mckmpi.trace.reader import open_run

RANKS = 2
_MEDIAN = re.compile(r"median\s+(\d+)\s*ns")
_REPS = re.compile(r"\((\d+)\s+(?:reps\b|x\s)")


#: The sides compared: `mckmpi run` options, or None for the bare app.
SIDES: dict[str, dict[str, float] | None] = {
    "traced": {"trace_flush": 1.0},      # streaming, as users run it
    "unstreamed": {"trace_flush": 0.0},  # the whole trace written at the end only
    "bare": None,
}


def _job(app: str, args: list[str], options: dict[str, float] | None, out: pathlib.Path) -> str:
    """Run apps/APP.py as a RANKS-rank job, under `mckmpi run --mode linux OPTIONS` or bare
    (None); its standard output."""
    job = Job((str(app_path(app)), *args), RANKS,
              None if options is None else {"mode": "linux", "out": str(out), **options})
    proc = job.render("mpiexec").run(600, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{app} ({options or 'bare'}) failed:\n{proc.stderr[-2000:]}")
    return proc.stdout


def _found(pattern: re.Pattern[str], app: str, stdout: str) -> re.Match[str]:
    found = pattern.search(stdout)
    if found is None:
        raise RuntimeError(f"no {pattern.pattern!r} in the output of apps/{app}.py:\n{stdout[-1000:]}")
    return found


def _fwq(options: dict[str, float] | None, samples: int, quantum_us: float, out: pathlib.Path) -> dict:
    stdout = _job("fwq", ["--samples", str(samples), "--quantum-us", str(quantum_us)], options,
                  out)
    reps = _REPS.search(stdout)
    result = {"median_ns": int(_found(_MEDIAN, "fwq", stdout).group(1)),
              "reps": int(reps.group(1)) if reps else None}
    if options is not None:
        with open_run(out) as run:
            shape = run["noise/fwq_ns"].shape
        if shape != (RANKS, samples):
            raise RuntimeError(f"run file {out} holds FWQ samples of shape {shape}")
    return result


_ITER = re.compile(r"median iteration\s+([0-9.]+) ms")
STENCIL = ("--local", "256x256", "--iterations", "300", "--scaling", "weak")


def _stencil(options: dict[str, float] | None, out: pathlib.Path) -> float:
    """Rank 0's median iteration time (ns) of one stencil job, from its summary line."""
    stdout = _job("stencil", list(STENCIL), options, out)
    return float(_found(_ITER, "stencil", stdout).group(1)) * 1e6


def flush_costs(work: pathlib.Path, flushes: int = 200, rows: int = 1000) -> dict:
    """Time of one streaming flush of `rows` int64 samples (1 s of 1 ms FWQ samples), three
    ways: a spool frame appended to a plain file (what the streamer does); an HDF5 file
    reopened, its dataset extended and written, then closed (consistent after every close);
    and an HDF5 file held open in SWMR mode, extended, written and flushed. Medians in us."""
    import time

    import h5py
    import numpy as np

    from mckmpi.trace.spool import SpoolWriter

    data = np.arange(rows, dtype=np.int64)

    def timed(step) -> float:
        times = []
        for i in range(flushes):
            t0 = time.perf_counter_ns()
            step(i)
            times.append(time.perf_counter_ns() - t0)
        return statistics.median(times) / 1e3

    spool = SpoolWriter(work / "flush.spool")
    spool_us = timed(lambda i: spool.data("noise/fwq_ns", "array", data, i * rows,
                                          (i + 1) * rows, {"": "ns"}, True))
    spool.close()
    reopen_path = work / "flush-reopen.h5"
    with h5py.File(reopen_path, "w", libver="latest") as f:
        f.create_dataset("fwq_ns", shape=(0,), maxshape=(None,), chunks=(rows,), dtype="i8")

    def reopen(i: int) -> None:
        with h5py.File(reopen_path, "r+", libver="latest") as f:
            ds = f["fwq_ns"]
            ds.resize(((i + 1) * rows,))
            ds[i * rows:] = data

    reopen_us = timed(reopen)
    swmr = h5py.File(work / "flush-swmr.h5", "w", libver="latest")
    ds = swmr.create_dataset("fwq_ns", shape=(0,), maxshape=(None,), chunks=(rows,), dtype="i8")
    swmr.swmr_mode = True

    def append(i: int) -> None:
        ds.resize(((i + 1) * rows,))
        ds[i * rows:] = data
        ds.flush()

    swmr_us = timed(append)
    swmr.close()
    return {"rows_per_flush": rows, "flushes": flushes, "spool_append_us": spool_us,
            "hdf5_reopen_append_close_us": reopen_us, "hdf5_swmr_append_flush_us": swmr_us,
            "runtime_counters_us": counter_cost(work, flushes)}


def counter_cost(work: pathlib.Path, flushes: int) -> float:
    """Median time (us) of what every flush adds in lwk mode: a sample of the LWK runtime's
    counters (`LwkRuntime.snapshot`: the main thread's /proc files, the arena, scheduler
    and interpreter statistics) and its flush to a spool (the values that changed)."""
    import time

    from mckmpi.lwk.arena import Arena
    from mckmpi.lwk.quiet import QuietState
    from mckmpi.lwk.runtime import LwkRuntime, ThreadCounters
    from mckmpi.lwk.scheduler import Scheduler
    from mckmpi.trace.spool import SpoolWriter
    from mckmpi.trace.tracer import Tracer
    from mckmpi.trace.writer import Streamer

    runtime = LwkRuntime(arena=Arena(4 << 20, hugepages="never", lock="never"),
                         quiet=QuietState(), scheduler=Scheduler(), boot_ns=0,
                         counters=ThreadCounters.of_this_thread())
    tracer = Tracer()
    streamer = Streamer(tracer, SpoolWriter(work / "counters.spool"))
    runtime.start_app()
    times = []
    try:
        for _ in range(flushes):
            t0 = time.perf_counter_ns()
            runtime.snapshot(tracer)
            streamer.flush()
            times.append(time.perf_counter_ns() - t0)
    finally:
        streamer.close()
        runtime.counters.close()
    return statistics.median(times) / 1e3


def _ratio(traced: list[float], bare: list[float]) -> float:
    return statistics.median(traced) / statistics.median(bare)


def run(out_dir: pathlib.Path, quick: bool = False) -> dict:
    """Alternate traced and bare FWQ and stencil jobs; write bench-tracing.json."""
    rounds = 2 if quick else 5
    samples = 500 if quick else 3000
    quantum_us = 1000.0
    out_dir.mkdir(parents=True, exist_ok=True)
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench-tracing-", dir=out_dir))
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    stencil: dict[str, list[float]] = {"traced": [], "bare": []}
    load_before = os.getloadavg()  # a shared host: what else ran is part of the numbers
    try:
        flush = flush_costs(work)
        for i in range(rounds):
            # Rotate which goes first, so a drifting machine does not favour one side.
            sides = list(SIDES)[i % len(SIDES):] + list(SIDES)[:i % len(SIDES)]
            for side in sides:
                print(f"bench tracing: round {i + 1}/{rounds}, {side}", flush=True)
                runs[side].append(_fwq(SIDES[side], samples, quantum_us,
                                       work / f"fwq-{side}-{i}.h5"))
                if side in stencil:
                    stencil[side].append(_stencil(SIDES[side], work / f"stencil-{i}.h5"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    medians = {k: [r["median_ns"] for r in v] for k, v in runs.items()}
    per_rep = {k: [r["median_ns"] / r["reps"] for r in v if r["reps"]] for k, v in runs.items()}
    ratio = _ratio(medians["traced"], medians["bare"])
    # Each round's traced run against the bare run next to it: drift between rounds cancels.
    paired = [t / b for t, b in zip(medians["traced"], medians["bare"])]
    streaming = _ratio(medians["traced"], medians["unstreamed"])
    result = {
        "benchmark": "tracing",
        "quick": quick,
        "ranks": RANKS,
        "rounds": rounds,
        "samples": samples,
        "quantum_us": quantum_us,
        "goal": "traced median FWQ sample within 1% of the bare one",
        "traced_median_ns": statistics.median(medians["traced"]),
        "bare_median_ns": statistics.median(medians["bare"]),
        "ratio_traced_vs_bare_median": ratio,
        "difference_percent": (ratio - 1) * 100,
        "paired_ratios": paired,
        "median_paired_ratio": statistics.median(paired),
        "streaming": {
            "flush_costs": flush,
            "goal": "median FWQ sample with the trace streamed every second within 1% of "
                    "the same run file written at the end only",
            "unstreamed_median_ns": statistics.median(medians["unstreamed"]),
            "ratio_streamed_vs_unstreamed_median": streaming,
            "difference_percent": (streaming - 1) * 100,
            "paired_ratios": [t / u for t, u in zip(medians["traced"], medians["unstreamed"])],
        },
        "spread_percent": {k: (max(v) / min(v) - 1) * 100 for k, v in medians.items()},
        "runs": runs,
        "stencil": {
            "args": list(STENCIL),
            "goal": "median per-iteration time under mckmpi run --mode linux <= 1.02x bare",
            "traced_median_iter_ns": statistics.median(stencil["traced"]),
            "bare_median_iter_ns": statistics.median(stencil["bare"]),
            "ratio_traced_vs_bare": _ratio(stencil["traced"], stencil["bare"]),
            "paired_ratios": [t / b for t, b in zip(stencil["traced"], stencil["bare"])],
            "runs_iter_ns": stencil,
        },
        "cpus": sorted(os.sched_getaffinity(0)),
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
    }
    if all(r["reps"] for v in runs.values() for r in v):
        result["traced_median_ns_per_rep"] = statistics.median(per_rep["traced"])
        result["bare_median_ns_per_rep"] = statistics.median(per_rep["bare"])
        result["ratio_traced_vs_bare_per_rep"] = _ratio(per_rep["traced"], per_rep["bare"])
        result["streaming"]["ratio_streamed_vs_unstreamed_per_rep"] = _ratio(
            per_rep["traced"], per_rep["unstreamed"])
    write_result(out_dir, "tracing", result)
    return result
