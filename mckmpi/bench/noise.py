"""Benchmark: where the noise of an LWK core comes from (FWQ and selfish detour, one rank).

One lwk-mode rank on an LWK core, the demo's background noise (2 ms of CPU every 10 ms
and a 4 KiB write) placed several ways, in the same run, in rounds:

- `quiet`: no noise source at all -- what the host itself does to the core (timer ticks,
  interrupts, and on a virtual machine the hypervisor); the floor of the other cases;
- `noise-on-linux-cores`: the noise confined to the Linux cores (the demo's lwk mode);
- `noise-on-linux-cores-isolated`: the same with the LWK core isolated (root only:
  mckmpi/node/isolation.py, applied around the case and restored after it);
- `noise-on-lwk-core`: the noise on the rank's own core (what the partition prevents);
- `quiet-fifo`: no noise, the rank SCHED_FIFO (`--rank-policy fifo`) instead of SCHED_OTHER.

Per case the worst round's FWQ excess percentiles (sample - the round's fastest sample), the
FWQ noise fraction and the detour noise fraction, what interrupted the LWK core during the
FWQ run (IPIs, timer, device interrupts, softirqs per second; steal and other tasks' CPU
time; from the run file's kernel/* tables), and each case's ratio to `quiet` of the same
round. If `noise-on-linux-cores` equals `quiet`, the partition removed the noise source and
what remains is the host's own; if `quiet` is already far from zero, that floor bounds any
linux/lwk ratio this host can show.

A second opinion from a tool mckmpi did not write: in the quiet and noise-on-linux-cores
cases (with and without isolation) `cyclictest` (rt-tests; SCHED_FIFO 80, 1 ms interval,
memory locked, the system's idle settings left as they are) measures its wake-up latency on
the LWK core and on a Linux core; its maximum and 99th percentile sit next to FWQ's.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import statistics
import subprocess
import tempfile
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

from mckmpi.bench import write_result
from mckmpi.analysis import kernel
from mckmpi.analysis import noise as noise_stats
from mckmpi.demo import NOISE, app_path, demo_noise
from mckmpi.jobs.launchers import Job
from mckmpi.node.isolation import isolated
from mckmpi.node.host import read_host
from mckmpi.node.partition import plan_node
from mckmpi.trace.reader import open_run

CASES = ("quiet", "noise-on-linux-cores", "noise-on-linux-cores-isolated", "noise-on-lwk-core",
         "quiet-fifo")
#: Cases in which cyclictest runs too.
CYCLICTEST_CASES = ("quiet", "noise-on-linux-cores", "noise-on-linux-cores-isolated")


def _job(app: list[str], policy: str, out: pathlib.Path) -> None:
    job = Job(tuple(app), 1, {"mode": "lwk", "rank_policy": policy, "out": str(out)})
    proc = job.render("mpiexec").run(600, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(app[:1])} failed:\n{proc.stderr[-2000:]}")


def _measure(out: pathlib.Path, policy: str, samples: int, detour_s: float) -> dict:
    """FWQ and detour of one lwk rank; their noise statistics and what interrupted the LWK
    core during FWQ."""
    _job([str(app_path("fwq")), "--samples", str(samples), "--quantum-us", "1000"], policy,
         out / "fwq.h5")
    _job([str(app_path("detour")), "--duration-s", f"{detour_s:g}"], policy, out / "detour.h5")
    with open_run(out / "fwq.h5") as run:
        (f,) = noise_stats.fwq(run)
        lwk_core = lwk_core_rates(kernel.cores(run))
    with open_run(out / "detour.h5") as run:
        (d,) = noise_stats.detours(run)
    return {"fwq_p50_us": f.p50_ns / 1e3, "fwq_p99_us": f.p99_ns / 1e3,
            "fwq_p999_us": f.p999_ns / 1e3, "fwq_max_us": f.max_ns / 1e3,
            "fwq_noise_pct": f.noise_fraction * 100, "detour_noise_pct": d.fraction * 100,
            "detour_max_us": d.max_ns / 1e3, **lwk_core}


def lwk_core_rates(cores: list[kernel.Core]) -> dict[str, float]:
    """What interrupted the rank's core, per second of the app (lwk_* keys)."""
    (core,) = kernel.rank_cores(cores)
    s = core.seconds
    return {
        "lwk_ipis_per_s": core.ipis / s,
        **{f"lwk_{name.lower()}_per_s": core.sources.get(("arch", name), 0) / s
           for name in ("LOC", *kernel.IPI_SOURCES)},
        "lwk_device_irqs_per_s": core.total("device") / s,
        "lwk_softirqs_per_s": core.total("softirq") / s,
        "lwk_switches_per_s": core.switches / s if core.switches >= 0 else float("nan"),
        "lwk_steal_ms_per_s": core.times_ns["steal"] / 1e6 / s,
        "lwk_other_tasks_ms_per_s": core.other_run_ns() / 1e6 / s,
    }


def cyclictest(cpu: int, seconds: float) -> dict[str, float]:
    """cyclictest's wake-up latency on `cpu` (us): max, 99th percentile (from its histogram,
    which counts up to 10 ms) and mean."""
    with tempfile.TemporaryDirectory(prefix="cyclictest-") as tmp:
        report = pathlib.Path(tmp) / "result.json"
        cmd = ["cyclictest", "-m", "-q", "-t", "1", "-a", str(cpu), "-p", "80", "-i", "1000",
               "-h", "10000", "-D", f"{max(1, round(seconds))}", "--default-system",
               f"--json={report}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=False)
        if proc.returncode != 0 or not report.exists():
            raise RuntimeError(f"cyclictest failed ({proc.returncode}): {proc.stderr[-500:]}")
        (thread,) = json.loads(report.read_text())["thread"].values()
    hist = {int(k): int(v) for k, v in thread.get("histogram", {}).items()}
    total, seen, p99 = int(thread["cycles"]), 0, float(thread["max"])
    for us in sorted(hist):
        seen += hist[us]
        if seen >= 0.99 * total:
            p99 = float(us)
            break
    return {"max_us": float(thread["max"]), "p99_us": p99, "avg_us": float(thread["avg"])}


def run(out_dir: pathlib.Path, quick: bool = False) -> dict:
    """Measure every case in rounds; write bench-noise.json."""
    rounds, samples, detour_s, cyclic_s = (1, 1000, 1.0, 1.0) if quick else (3, 5000, 3.0, 5.0)
    host = read_host()
    plan = plan_node(host, 1, mode="lwk")
    linux, lwk = list(plan.linux_cpus), list(plan.rank(0).cpus)
    placements: dict[str, Callable[[], Any]] = {
        "quiet": lambda: None,
        "noise-on-linux-cores": lambda: demo_noise(linux),
        "noise-on-linux-cores-isolated": lambda: demo_noise(linux),
        "noise-on-lwk-core": lambda: demo_noise(lwk),
        "quiet-fifo": lambda: None,
    }
    skipped = {}
    if os.geteuid() != 0:
        skipped["noise-on-linux-cores-isolated"] = "isolation needs root"
    if shutil.which("cyclictest") is None:
        skipped["cyclictest"] = "cyclictest (Debian/Ubuntu package rt-tests) is not installed"
    cases = [c for c in CASES if c not in skipped]
    out_dir.mkdir(parents=True, exist_ok=True)
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench-noise-", dir=out_dir))
    results: dict[str, list[dict]] = {case: [] for case in cases}
    cyclic: dict[str, list[dict]] = {}
    try:
        for i in range(rounds):
            for case in cases:
                print(f"bench noise: round {i + 1}/{rounds}, {case}", flush=True)
                where = work / f"{case}-{i}"
                where.mkdir()
                with isolated(linux, lwk) if case.endswith("-isolated") else nullcontext():
                    source = placements[case]()
                    try:
                        results[case].append(_measure(
                            where, "fifo" if case == "quiet-fifo" else "other", samples, detour_s))
                        if case in CYCLICTEST_CASES and "cyclictest" not in skipped:
                            for side, cpu in (("lwk", lwk[0]), ("linux", linux[0])):
                                cyclic.setdefault(f"{case}/{side}-core", []).append(
                                    cyclictest(cpu, cyclic_s))
                    finally:
                        if source is not None:
                            source.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {case: {k: max(r[k] for r in rs) for k in rs[0]} for case, rs in results.items()}
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
        "skipped": skipped,
        "worst_round": summary,
        "ratio_to_quiet_median_of_rounds": ratios,
        "cyclictest_worst_round": {k: {m: max(r[m] for r in rs) for m in rs[0]}
                                   for k, rs in cyclic.items()},
        "cyclictest": {"seconds": cyclic_s, "interval_us": 1000, "priority": 80,
                       "rounds_data": cyclic},
        "rounds_data": results,
        "cpus": sorted(os.sched_getaffinity(0)),
    }
    write_result(out_dir, "noise", result)
    return result
