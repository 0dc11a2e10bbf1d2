"""The main job (`mckmpi demo`): a small Linux-vs-LWK study on this host, with its report.

FWQ, selfish detour and the stencil run in linux mode and in lwk mode under the same
background noise: a daemon-like process with periodic CPU bursts and small file writes.
In linux mode the noise may run anywhere, as daemons do on an untuned node, and ranks use
every core; in lwk mode it is confined to the Linux cores, as Linux services are on a
McKernel node, and the noise benchmarks run one rank per LWK core. As root the lwk runs also
isolate their LWK cores (`mckmpi run --isolate`: IRQs, workqueues and kernel threads on the
Linux cores, no deep idle), and each runs a second time without isolation -- the third
column, "lwk without isolation", so what the partition and what the isolation contribute
are both visible. Each pair of runs is compared, plots go to the output directory, and every
compared metric (FWQ excess p50 .. max and noise fraction, detours, stencil iteration times,
what interrupted the rank cores) with the headline numbers and their goals to
`summary.json` there.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mckmpi.errors import UsageError
from mckmpi.jobs.launchers import Job
from mckmpi.utility.table import counted

if TYPE_CHECKING:
    from mckmpi.background import NoiseSource

APPS = Path(__file__).resolve().parent.parent / "apps"

#: The background noise: 2 ms of CPU every 10 ms and a 4 KiB write (README, the demo study).
NOISE: dict[str, float] = {"period_ms": 10.0, "burst_ms": 2.0, "write_bytes": 4096}

#: (section, metric) of the comparison -> the goal factor by which lwk must be lower.
GOALS = {
    ("FWQ", "excess p99.9, worst rank"): 10.0,
    ("detours", "noise fraction, mean of ranks"): 10.0,
    ("app", "iteration p50 (slowest rank)"): None,
}


def app_path(name: str) -> Path:
    """An app of the source tree's apps/ directory."""
    path = APPS / f"{name}.py"
    if not path.is_file():
        raise UsageError(f"app {name} not found at {path}: run from a source checkout")
    return path


def demo_noise(cpus: Sequence[int] | None) -> NoiseSource:
    """Start the demo's background noise on `cpus` (None: anywhere, as a daemon would)."""
    from mckmpi.background import start_noise

    return start_noise(cpus, period_ms=NOISE["period_ms"], burst_ms=NOISE["burst_ms"],
                       write_bytes=int(NOISE["write_bytes"]))


def launch(job: Job, timeout: float = 600, quiet: bool = False) -> subprocess.CompletedProcess:
    """Start `job` through mpiexec and wait (its output captured when `quiet`)."""
    output = subprocess.PIPE if quiet else None
    return job.render("mpiexec").run(timeout, text=True, stdout=output, stderr=output)


#: The columns of the study: how each app runs.
LINUX, LWK, LWK_NO_ISOLATION = "linux", "lwk", "lwk-no-isolation"


@dataclass(frozen=True)
class DemoRun:
    """One run of the study: an app in one mode on `ranks` ranks, its LWK cores isolated or not."""

    app: str
    mode: str
    ranks: int
    args: tuple[str, ...]
    oversubscribe: bool = False
    isolate: bool = False
    twin: bool = False  # the un-isolated twin of an isolated lwk run

    @property
    def column(self) -> str:
        """linux, lwk, or lwk-no-isolation (an lwk run beside an isolated one)."""
        return LWK_NO_ISOLATION if self.mode == "lwk" and self.twin else self.mode

    def job(self, out: Path) -> Job:
        """The job that runs it, its run file at `out`."""
        options: dict[str, Any] = {"mode": self.mode, "out": str(out)}
        if self.isolate:
            options["isolate"] = True
        return Job((str(app_path(self.app)), *self.args), self.ranks, options,
                   oversubscribe=self.oversubscribe)


def layout(cpus: int, samples: int, detour_s: float, isolate: bool = False) -> list[DemoRun]:
    """The jobs for a host with `cpus` CPUs: linux mode on every core, lwk mode on the cores
    left after one Linux core (the stencil keeps its rank count and oversubscribes); with
    `isolate` the lwk runs isolate their cores and each has a twin without isolation."""
    if cpus < 2:
        raise UsageError("the demo needs at least 2 CPUs: one Linux core and one LWK core")
    lwk = cpus - 1
    fwq = ("--samples", str(samples), "--quantum-us", "1000")
    detour = ("--duration-s", f"{detour_s:g}")
    stencil = ("--local", "256x256", "--iterations", "300", "--scaling", "weak")
    runs = []
    for app, args, lwk_ranks in (("fwq", fwq, lwk), ("detour", detour, lwk), ("stencil", stencil, cpus)):
        over = lwk_ranks > lwk
        runs.append(DemoRun(app, "linux", cpus, args))
        runs.append(DemoRun(app, "lwk", lwk_ranks, args, oversubscribe=over, isolate=isolate))
        if isolate:
            runs.append(DemoRun(app, "lwk", lwk_ranks, args, oversubscribe=over, twin=True))
    return runs


def isolation_text(metrics: Sequence[Any]) -> str:
    """The headline metrics and the kernel's rates, without isolation vs with, one line each."""
    keep = [m for m in metrics if (m.section, m.name) in GOALS or m.section == "kernel"]
    return "\n".join(
        f"{m.section} {m.name}: {m.a:.4g} -> {m.b:.4g} {m.unit}".rstrip()
        + ("" if not m.a or not m.b else f" ({m.a / m.b:.3g}x)") for m in keep)


def demo(out: str, samples: int = 3000, detour_s: float = 3.0) -> int:
    """Run the study, print the comparisons and write plots and summary.json to `out`."""
    from mckmpi.analysis import compare
    from mckmpi.analysis.plots import compare_plots
    from mckmpi.analysis.summary import summarize
    from mckmpi.node.partition import plan_node
    from mckmpi.node.host import read_host
    from mckmpi.trace.reader import open_run

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    host = read_host()
    linux_cpus = plan_node(host, 1, mode="lwk", oversubscribe=True).linux_cpus
    isolate = os.geteuid() == 0
    jobs = layout(len(host.cpus), samples, detour_s, isolate)
    print(f"mckmpi demo: {len(host.cpus)} CPUs; linux mode runs ranks on every core, lwk mode "
          f"keeps CPU {linux_cpus[0]} for Linux (noise, proxy) and runs the noise benchmarks "
          f"one rank per LWK core ({len(host.cpus) - 1}); background noise: "
          f"{NOISE['burst_ms']:g} ms of CPU every {NOISE['period_ms']:g} ms and a "
          f"{NOISE['write_bytes']} B write; " + (
              "lwk runs isolate their LWK cores, each beside a run without isolation" if isolate
              else "no isolation of the LWK cores (it needs root)"), flush=True)
    started = time.monotonic()
    files: dict[tuple[str, str], Path] = {}
    for i, job in enumerate(jobs, 1):
        path = out_dir / f"{job.app}-{job.column}.h5"
        where = "anywhere" if job.mode == "linux" else f"CPU {','.join(map(str, linux_cpus))}"
        print(f"[{i}/{len(jobs)} {time.monotonic() - started:5.1f}s] {job.app}, {job.mode} mode"
              f"{', isolated' if job.isolate else ''}{', without isolation' if job.twin else ''}, "
              f"{counted(job.ranks, 'rank')}{', oversubscribed' if job.oversubscribe else ''}; "
              f"noise {where}", flush=True)
        with demo_noise(None if job.mode == "linux" else linux_cpus):
            proc = launch(job.job(path), quiet=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout + proc.stderr)
            print(f"mckmpi: demo job {job.app} ({job.column}) failed with exit status "
                  f"{proc.returncode}", file=sys.stderr)
            return proc.returncode
        files[(job.app, job.column)] = path

    headlines: list[dict[str, Any]] = []
    comparisons: dict[str, list[dict[str, Any]]] = {}
    for app in dict.fromkeys(job.app for job in jobs):
        with open_run(files[(app, "linux")]) as ra, open_run(files[(app, "lwk")]) as rb:
            a, b = summarize(ra), summarize(rb)
        print(f"\n=== {app}: linux (A) vs lwk (B) " + "=" * 40)
        print(compare.text(a, b))
        plots = compare_plots(a, b, compare.labels(a, b), out_dir / app)
        print("plots: " + ", ".join(str(p) for p in plots))
        metrics = compare.metrics(a, b)
        third: dict[tuple[str, str], float] = {}
        if (app, LWK_NO_ISOLATION) in files:
            with open_run(files[(app, LWK_NO_ISOLATION)]) as rc:
                c = summarize(rc)
            third = {(m.section, m.name): m.b for m in compare.metrics(a, c)}
            print(f"\n--- {app}: what the isolation adds (lwk without isolation -> lwk) ---")
            print(isolation_text(compare.metrics(c, b)))
        comparisons[app] = [
            {"metric": f"{m.section} {m.name}", "unit": m.unit, "linux": m.a, "lwk": m.b,
             **({LWK_NO_ISOLATION: third[(m.section, m.name)]} if (m.section, m.name) in third
                else {})}
            for m in metrics]
        for m in metrics:
            if (m.section, m.name) in GOALS:
                goal = GOALS[(m.section, m.name)]
                factor = m.a / m.b if m.b else math.inf
                h = {"app": app, "metric": f"{m.section} {m.name}", "unit": m.unit,
                     "linux": m.a, "lwk": m.b, "linux_over_lwk": factor,
                     "goal_linux_over_lwk": goal,
                     "goal_met": None if goal is None else factor >= goal}
                if (m.section, m.name) in third:
                    noiso = third[(m.section, m.name)]
                    h[LWK_NO_ISOLATION] = noiso
                    h["linux_over_lwk_no_isolation"] = m.a / noiso if noiso else math.inf
                headlines.append(h)
    print(f"\n=== summary ({time.monotonic() - started:.0f} s) " + "=" * 40)
    for h in headlines:
        verdict = "" if h["goal_linux_over_lwk"] is None else \
            f"  goal >= {h['goal_linux_over_lwk']:g}x: {'met' if h['goal_met'] else 'NOT met'}"
        noiso = "" if LWK_NO_ISOLATION not in h else (
            f"  lwk without isolation {h[LWK_NO_ISOLATION]:10.4g} "
            f"(linux/that {h['linux_over_lwk_no_isolation']:.3g})")
        print(f"{h['app']:8} {h['metric']:40} linux {h['linux']:10.4g}  lwk {h['lwk']:10.4g} "
              f"{h['unit']:3}  linux/lwk {h['linux_over_lwk']:7.3g}{verdict}{noiso}")
    summary = {"cpus": len(host.cpus), "linux_cpus": list(linux_cpus), "noise": NOISE,
               "isolation": "lwk runs isolated, each beside a run without isolation" if isolate
               else "no isolation (needs root)",
               "jobs": [dict(job.__dict__, column=job.column) for job in jobs],
               "headlines": headlines, "comparisons": comparisons}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if any(h["goal_met"] is False for h in headlines):
        print("a goal not met: `mckmpi bench noise` measures what an LWK core of this host "
              "suffers with no noise source at all, the floor of any linux/lwk ratio here")
    print(f"written: {out_dir / 'summary.json'}, run files and plots in {out_dir}{os.sep}")
    return 0
