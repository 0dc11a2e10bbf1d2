"""Benchmark: `mckmpi runs query` on a catalogue of 10^4 runs (10^3 with `quick`).

The catalogue is filled through `catalogue.store`, the path `mckmpi run` and `runs index`
take, with synthetic runs shaped like real ones: 4 apps x 2 modes x 8 systems, 9 metrics
and 20 options each, one run every 10 minutes. Measured (best of `REPEATS`):

- the library call `catalogue.query` with filters (app, mode, system, an option, a date
  range), and its baseline in the same run: the same call without filters, returning every
  run with its metrics and options;
- the command `mckmpi runs query ...` in a fresh process (what a user waits for), and its
  baseline: `mckmpi --version`, the interpreter and CLI start-up every command pays;
- adding one run (`store`, one transaction), the cost `mckmpi run` adds at the end of a job.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

from mckmpi.analysis import catalogue
from mckmpi.bench import write_result

APPS = ("fwq", "detour", "stencil", "cg")
MODES = ("linux", "lwk")
SYSTEMS = tuple(f"cluster{i}" for i in range(8))
REPEATS = 5
START_S = 1_790_000_000.0


def _entry(i: int) -> catalogue.Entry:
    app, mode = APPS[i % len(APPS)], MODES[(i // len(APPS)) % len(MODES)]
    system = SYSTEMS[(i // 8) % len(SYSTEMS)]
    created_s = START_S + 600 * i
    created = time.strftime("%Y-%m-%dT%H:%M:%S+0000", time.gmtime(created_s))
    options = {f"setting{k}": str((i + k) % 3) for k in range(18)}
    options.update({"mem": "64M" if i % 2 else "1G", "app:--samples": "3000"})
    fields = {"schema_version": 2, "app": app, "mode": mode, "host": f"{system}-n1",
              "cluster": system, "system": system, "commit_id": f"{i // 100:07x}",
              "version": "0.1.0", "created": created, "created_s": created_s, "ranks": 64,
              "nodes": 2, "slurm_job_id": str(i), "app_args": "--samples 3000",
              "command": f"mckmpi run -- apps/{app}.py", "config": f"{app} {mode} 64",
              "provenance": json.dumps({"hosts": [f"{system}-n1", f"{system}-n2"],
                                        "kernel": "6.1.0", "python": "3.11.7"})}
    metrics = {name: float((i * 7 + k) % 100) for k, name in enumerate(
        ("wall_s", "iter_us", "fwq_p50_us", "fwq_p999_us", "fwq_max_us", "noise_pct",
         "verified", "offload_calls", "offload_p50_us"))}
    return catalogue.Entry(f"{system}/{app}-{mode}-{i}.h5", 1 << 20, i, True, fields, metrics,
                           options)


def _best(action, repeats: int = REPEATS) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = action()
        best = min(best, time.perf_counter() - t0)
    return best, result


def run(out_dir: pathlib.Path, quick: bool = False) -> dict:
    """Fill a catalogue, time the queries and their baselines; write bench-catalogue.json."""
    runs = 1_000 if quick else 10_000
    out_dir.mkdir(parents=True, exist_ok=True)
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench-catalogue-", dir=out_dir))
    try:
        t0 = time.perf_counter()
        with catalogue.connect(work) as db:
            for i in range(runs):
                catalogue.store(db, _entry(i))
        fill_s = time.perf_counter() - t0
        filters = catalogue.Filters(app="fwq", mode="lwk", system="cluster3",
                                    options={"mem": "1G"}, since="2026-09-01",
                                    until="2027-12-31")
        query_s, selected = _best(lambda: catalogue.query(work, filters))
        all_s, everything = _best(lambda: catalogue.query(work))
        cli = [sys.executable, "-m", "mckmpi", "runs", "query", str(work), "--app", "fwq",
               "--mode", "lwk", "--system", "cluster3", "--option", "mem=1G",
               "--since", "2026-09-01", "--until", "2027-12-31"]

        def command(args: list[str]) -> int:
            proc = subprocess.run(args, capture_output=True, text=True, timeout=120, check=True)
            return len(proc.stdout.splitlines())

        cli_s, cli_lines = _best(lambda: command(cli))
        floor_s, _ = _best(lambda: command([sys.executable, "-m", "mckmpi", "--version"]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if len(selected) != cli_lines or len(everything) != runs:
        raise RuntimeError(f"catalogue bench: {len(selected)} runs selected, the command printed "
                           f"{cli_lines}; {len(everything)} of {runs} runs stored")
    result = {
        "benchmark": "catalogue",
        "quick": quick,
        "runs": runs,
        "selected": len(selected),
        "fill_s": fill_s,
        "store_per_run_ms": 1e3 * fill_s / runs,
        "query": {"filtered_s": query_s, "baseline_all_runs_s": all_s,
                  "ratio": query_s / all_s},
        "command": {"runs_query_s": cli_s, "baseline_startup_s": floor_s,
                    "ratio": cli_s / floor_s, "under_1s": cli_s < 1.0},
    }
    write_result(out_dir, "catalogue", result)
    return result
