"""Benchmark: where the noise of an LWK core comes from (FWQ and selfish detour, one rank).

One lwk-mode rank on an LWK core, the demo's background noise (2 ms of CPU every 10 ms
and a 4 KiB write) placed four ways, in the same run, in rounds:

- `quiet`: no noise source at all -- what the host itself does to the core (timer ticks,
  interrupts, and on a virtual machine the hypervisor); the floor of the other cases;
- `noise-on-linux-cores`: the noise confined to the Linux cores (the demo's lwk mode);
- `noise-on-lwk-core`: the noise on the rank's own core (what the partition prevents);
- `quiet-fifo`: no noise, the rank SCHED_FIFO (`--rank-policy fifo`) instead of SCHED_OTHER.

Per case the worst round's FWQ excess percentiles (sample - the round's fastest sample), the
FWQ noise fraction and the detour noise fraction, and each case's ratio to `quiet` of the
same round. If `noise-on-linux-cores` equals `quiet`, the partition removed the noise
source and what remains is the host's own; if `quiet` is already far from zero, that floor
bounds any linux/lwk ratio this host can show.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import statistics
import tempfile
from collections.abc import Callable
from typing import Any

from mckmpi.bench import write_result
from mckmpi.analysis import noise as noise_stats
from mckmpi.demo import NOISE, app_path, demo_noise
from mckmpi.jobs.launchers import Job
from mckmpi.node.host import read_host
from mckmpi.node.partition import plan_node
from mckmpi.trace.reader import open_run

CASES = ("quiet", "noise-on-linux-cores", "noise-on-lwk-core", "quiet-fifo")


def _job(app: list[str], policy: str, out: pathlib.Path) -> None:
    job = Job(tuple(app), 1, {"mode": "lwk", "rank_policy": policy, "out": str(out)})
    proc = job.render("mpiexec").run(600, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(app[:1])} failed:\n{proc.stderr[-2000:]}")


def _measure(out: pathlib.Path, policy: str, samples: int, detour_s: float) -> dict:
    """FWQ and detour of one lwk rank; their noise statistics."""
    _job([str(app_path("fwq")), "--samples", str(samples), "--quantum-us", "1000"], policy,
         out / "fwq.h5")
    _job([str(app_path("detour")), "--duration-s", f"{detour_s:g}"], policy, out / "detour.h5")
    with open_run(out / "fwq.h5") as run:
        (f,) = noise_stats.fwq(run)
    with open_run(out / "detour.h5") as run:
        (d,) = noise_stats.detours(run)
    return {"fwq_p50_us": f.p50_ns / 1e3, "fwq_p99_us": f.p99_ns / 1e3,
            "fwq_p999_us": f.p999_ns / 1e3, "fwq_max_us": f.max_ns / 1e3,
            "fwq_noise_pct": f.noise_fraction * 100, "detour_noise_pct": d.fraction * 100,
            "detour_max_us": d.max_ns / 1e3}


def run(out_dir: pathlib.Path, quick: bool = False) -> dict:
    """Measure every case in rounds; write bench-noise.json."""
    rounds, samples, detour_s = (1, 1000, 1.0) if quick else (3, 5000, 3.0)
    host = read_host()
    plan = plan_node(host, 1, mode="lwk")
    linux, lwk = list(plan.linux_cpus), list(plan.rank(0).cpus)
    placements: dict[str, Callable[[], Any]] = {
        "quiet": lambda: None,
        "noise-on-linux-cores": lambda: demo_noise(linux),
        "noise-on-lwk-core": lambda: demo_noise(lwk),
        "quiet-fifo": lambda: None,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench-noise-", dir=out_dir))
    results: dict[str, list[dict]] = {case: [] for case in CASES}
    try:
        for i in range(rounds):
            for case in CASES:
                print(f"bench noise: round {i + 1}/{rounds}, {case}", flush=True)
                where = work / f"{case}-{i}"
                where.mkdir()
                source = placements[case]()
                try:
                    results[case].append(_measure(where, "fifo" if case == "quiet-fifo" else "other",
                                                  samples, detour_s))
                finally:
                    if source is not None:
                        source.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    keys = list(results["quiet"][0])
    summary = {case: {k: max(r[k] for r in rs) for k in keys} for case, rs in results.items()}
    ratios = {case: {k: statistics.median(r[k] / q[k] if q[k] else float("nan")
                                          for r, q in zip(rs, results["quiet"]))
                     for k in ("fwq_p999_us", "fwq_noise_pct", "detour_noise_pct")}
              for case, rs in results.items() if case != "quiet"}
    result = {
        "benchmark": "noise",
        "quick": quick,
        "rounds": rounds,
        "fwq_samples": samples,
        "quantum_us": 1000,
        "detour_s": detour_s,
        "noise": NOISE,
        "linux_cpus": linux,
        "lwk_cpus": lwk,
        "worst_round": summary,
        "ratio_to_quiet_median_of_rounds": ratios,
        "rounds_data": results,
        "cpus": sorted(os.sched_getaffinity(0)),
    }
    write_result(out_dir, "noise", result)
    return result
