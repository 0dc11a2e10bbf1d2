"""Post-processing commands: report, compare, simulate, study (collect, plot).

They parse, call `mckmpi.analysis` and print; none of them imports mpi4py or the runtime,
so run files are read anywhere. Study actions register with `@study_action`, so other
concerns (planning and submitting studies) can add theirs to the same command.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mckmpi.errors import UsageError
from mckmpi.frontend.registry import command
from mckmpi.utility.table import counted


def _plots_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plots", metavar="DIR", help="also write PNG plots into DIR")


def _plots_dir(args: argparse.Namespace) -> Path:
    """--plots as a directory that takes files (one line if it is a file or unwritable)."""
    from mckmpi.utility.outputs import output_dir

    return output_dir(args.plots, "--plots")


def _print_json(obj: Any) -> None:
    from mckmpi.analysis.summary import plain

    print(json.dumps(plain(obj), indent=2))


def _print_plots(paths: list[Path]) -> None:
    for path in paths:
        print(f"plot  {path}")


# --- report --------------------------------------------------------------------------------


@command(
    "report",
    "tables (and plots) of what a run file holds",
    """Tables of one run file: header and provenance, ranks, FWQ/FTQ/detour noise per rank,
offloaded system calls, memory and scheduler counters, app figures.

  mckmpi report results/demo/fwq-linux.h5
  mckmpi report RUN.h5 --plots results/plots      (PNG: FWQ over time, noise tail,
                                                  detour histogram, offload latency CDF,
                                                  per-iteration time)
  mckmpi report RUN.h5 --json                     (every number, every rank)

  mckmpi report results/fwq-linux-...h5.partial (a job that did not finish: read as far
                                                  as its data reached, said in one line)

FWQ excess = sample - the rank's smallest sample; percentiles are exact samples.""",
)
def _build_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_file", help="an HDF5 run file written by mckmpi run (or its .partial)")
    _plots_option(p)
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")


@_build_report.run
def _cmd_report(args: argparse.Namespace) -> int:
    from mckmpi.analysis.report import render_summary
    from mckmpi.analysis.summary import summarize
    from mckmpi.trace.reader import open_run

    with open_run(args.run_file, allow_incomplete=True) as run:
        if run.note:
            print(f"mckmpi: {run.note}", file=sys.stderr, flush=True)
        summary = summarize(run)
    plots: list[Path] = []
    if args.plots:
        from mckmpi.analysis.plots import report_plots

        plots = report_plots(summary, _plots_dir(args))
    if args.json:
        _print_json({**summary.to_json(), "plots": plots})
    else:
        print(render_summary(summary))
        _print_plots(plots)
    return 0


# --- compare -------------------------------------------------------------------------------


@command(
    "compare",
    "two run files side by side with ratios (e.g. linux vs lwk)",
    """Compare two run files metric by metric: B/A ratios, and for every metric with a
direction (noise, latency, time: lower is better) which run is better and by how much.

  mckmpi compare results/demo/fwq-linux.h5 results/demo/fwq-lwk.h5 --plots results/demo""",
)
def _build_compare(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", metavar="A.h5", help="first run file (the baseline, e.g. linux mode)")
    p.add_argument("b", metavar="B.h5", help="second run file (e.g. lwk mode)")
    _plots_option(p)
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")


@_build_compare.run
def _cmd_compare(args: argparse.Namespace) -> int:
    from mckmpi.analysis import compare
    from mckmpi.analysis.summary import summarize
    from mckmpi.trace.reader import open_run

    with open_run(args.a) as ra, open_run(args.b) as rb:
        a, b = summarize(ra), summarize(rb)
    plots: list[Path] = []
    if args.plots:
        from mckmpi.analysis.plots import compare_plots

        plots = compare_plots(a, b, compare.labels(a, b), _plots_dir(args))
    if args.json:
        _print_json({**compare.to_json(a, b), "plots": plots})
    else:
        print(compare.text(a, b))
        _print_plots(plots)
    return 0


# --- simulate ------------------------------------------------------------------------------


@command(
    "simulate",
    "predict the slowdown of a bulk-synchronous app at 10^3..10^6 ranks",
    """Predict how measured noise is amplified at scale: every iteration each of P ranks
computes --work-us of work, then all synchronise, so the slowest rank sets the pace. Each
rank's noise is drawn independently from the measured per-core traces (FWQ samples or
detour events); the maximum over P ranks is drawn exactly, without simulating ranks.

  mckmpi simulate --from results/demo/fwq-linux.h5 --ranks 1e3,1e4,1e5,1e6 --work-us 1000""",
)
def _build_simulate(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--from",
        dest="run_file",
        required=True,
        metavar="RUN.h5",
        help="run file with FWQ samples or detour events",
    )
    p.add_argument(
        "--ranks", required=True, metavar="LIST", help="rank counts, e.g. 1e3,1e4,1e5,1e6"
    )
    p.add_argument(
        "--work-us",
        type=float,
        required=True,
        metavar="W",
        help="work per iteration and rank, in microseconds",
    )
    p.add_argument(
        "--iterations",
        type=int,
        default=10_000,
        metavar="N",
        help="iterations of the Monte Carlo run [10000]",
    )
    p.add_argument(
        "--source",
        choices=("auto", "fwq", "detours"),
        default="auto",
        help="which trace the noise comes from [auto: FWQ if recorded, else detours]",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed [0]")
    p.add_argument("--allreduce-round-us", type=float, metavar="C",
                   help="also model the synchronisation as recursive-doubling allreduce trees "
                        "with C us per round (LogGP: L + 2o + sG), noise hitting the message "
                        "overheads too (an allreduce-bound app such as CG)")
    p.add_argument("--allreduces", type=int, default=1, metavar="N",
                   help="allreduces per iteration for --allreduce-round-us [1]")
    _plots_option(p)
    p.add_argument("--json", action="store_true", help="print the prediction as JSON")


#: The most allreduces per iteration `simulate --allreduce-round-us` models (a CG iteration
#: has two or three; every one adds log2(ranks) rounds of draws).
MAX_ALLREDUCES = 100


@_build_simulate.run
def _cmd_simulate(args: argparse.Namespace) -> int:
    from mckmpi.analysis import simulate
    from mckmpi.trace.reader import open_run

    ranks = simulate.parse_ranks(args.ranks)
    if args.allreduce_round_us is not None and (
            not 0 < args.allreduce_round_us < math.inf
            or not 1 <= args.allreduces <= MAX_ALLREDUCES):
        raise UsageError("--allreduce-round-us must be positive and --allreduces at least 1 "
                         f"and at most {MAX_ALLREDUCES} (the model's time grows with each)")
    with open_run(args.run_file) as run:
        dist = simulate.load(run, args.work_us * 1e3, args.source)
        attrs, provenance = run.attrs, run.provenance
    sim = simulate.simulate(dist, ranks, args.iterations, args.seed, path=args.run_file)
    tree = None
    if args.allreduce_round_us is not None:
        tree = simulate.tree_predictions(dist, sim, args.allreduce_round_us * 1e3, args.allreduces)
    plots: list[Path] = []
    if args.plots:
        from mckmpi.analysis.plots import run_stamp, simulation

        plots = [simulation(sim, _plots_dir(args) / f"simulate-{Path(args.run_file).stem}.png",
                            run_stamp(attrs, provenance))]
    if args.json:
        extra = {} if tree is None else {"tree": [{"ranks": p, "iteration_ns": t} for p, t in tree]}
        _print_json({**sim.to_json(), **extra, "plots": plots})
    else:
        print(simulate.text(sim))
        if tree is not None:
            print()
            print(simulate.tree_text(sim, tree, args.allreduce_round_us * 1e3, args.allreduces))
        _print_plots(plots)
    return 0


# --- check ---------------------------------------------------------------------------------


@command(
    "check",
    "pass or fail runs against a reference file (exit 1 on a regression beyond tolerance and noise)",
    """Check a run file, a study file or a directory of run files against a reference file
(TOML, one per system and app): every metric it names must lie within its band, value *
(1 + lower) .. value * (1 + upper). A point's value is the median of its repeats; it fails
only when the whole 95% interval of the repeats lies outside the band (beyond the noise).
A point or metric the reference names but no run has fails too. Exit status: 0 pass,
1 a failure, 2 an unusable reference or input.

  mckmpi check results/stencil/study.h5 --reference references/mckmpi-stencil.toml
  mckmpi check RUN.h5 --reference ref.toml --json

Reference file:
  system = "mckmpi"                       # Slurm cluster or host name of the runs
  app = "stencil"
  [all]                                   # every point
  verified = { value = 1, tolerance = 0 }
  [points."stencil-strong-linux-n2"]
  iter_us = { value = 850.0, lower = -0.5, upper = 0.1, unit = "us" }""",
)
def _build_check(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", metavar="RUN.h5|STUDY.h5|DIR", help="what to check")
    p.add_argument("--reference", required=True, metavar="FILE", help="reference file (TOML)")
    p.add_argument("--json", action="store_true", help="print the verdicts as JSON")


@_build_check.run
def _cmd_check(args: argparse.Namespace) -> int:
    from mckmpi.analysis import check, study

    ref = check.load_reference(args.reference)
    verdicts = check.check(study.rows_of(args.runs), ref)
    if args.json:
        _print_json({"reference": str(ref.path), "verdicts": [
            {"point": v.point, "metric": v.metric, "value": v.bound.value,
             "low": v.bound.low, "high": v.bound.high, **v.measured.to_json(),
             "status": v.status} for v in verdicts]})
    else:
        print(check.text(verdicts, ref))
    return 1 if check.failed(verdicts) else 0


# --- study ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyAction:
    name: str
    summary: str
    build: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace], int]


STUDY_ACTIONS: list[StudyAction] = []


def study_action(name: str, summary: str) -> Callable:
    """Register an action of `mckmpi study` (same shape as `@command`: the decorated
    function fills the action's parser; `.run` attaches its handler)."""

    def register(build: Callable[[argparse.ArgumentParser], None]) -> Callable:
        def attach(handler: Callable[[argparse.Namespace], int]) -> Callable:
            STUDY_ACTIONS.append(StudyAction(name, summary, build, handler))
            return handler

        build.run = attach  # type: ignore[attr-defined]
        return build

    return register


@command(
    "study",
    "plan, submit and run scaling studies (Slurm or this host); tables and plots of many runs",
    """Scaling and noise studies: planned, run (one Slurm job per point, or mpiexec on this
host), then turned into one table and its plots:

  mckmpi study plan --app stencil --nodes 1,2,4 --ranks-per-node 8 --scaling strong
                                    (job scripts and manifest in results/study-stencil-strong)
  mckmpi study submit results/study-stencil-strong     (sbatch every point; job ids recorded)
  mckmpi study status results/study-stencil-strong     (state, exit code, log of each job)
  mckmpi study run results/study-stencil-strong        (a --local plan, here via mpiexec)
  mckmpi study collect results/study-stencil-strong -o study.h5  (one row per run: app,
                                    mode, nodes, ranks, size, times, speedup, efficiency)
  mckmpi study plot study.h5 --plots results/plots     (time per iteration with 95% CI,
                                    speedup, efficiency; noise surveys per node and mode)""",
)
def _build_study(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    for action in STUDY_ACTIONS:
        ap = sub.add_parser(action.name, help=action.summary, description=action.summary)
        action.build(ap)
        ap.set_defaults(study_handler=action.handler, command_parser=ap)


@_build_study.run
def _cmd_study(args: argparse.Namespace) -> int:
    return int(args.study_handler(args) or 0)


@study_action("collect", "summarise every run file under DIR into a study file")
def _build_collect(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "directory", metavar="DIR", help="directory searched recursively for *.h5 run files"
    )
    p.add_argument("-o", "--output", required=True, metavar="STUDY.h5", help="study file to write")


@_build_collect.run
def _cmd_collect(args: argparse.Namespace) -> int:
    import sys

    from mckmpi.analysis import study

    from mckmpi.utility.outputs import new_hdf5_file

    new_hdf5_file(args.output, "-o", replaces=study.STUDY_SCHEMA)
    collected = study.collect(args.directory)
    path = study.write(collected.rows, args.output, source=str(Path(args.directory).resolve()))
    print(study.text(collected.rows))
    print()
    print(study.points_text(study.points(collected.rows)))
    for skipped, why in collected.skipped:
        print(f"mckmpi: skipped {skipped}: {why}", file=sys.stderr)
    print(
        f"\nstudy file {path}: {counted(len(collected.rows), 'run')}, "
        f"{counted(len(collected.skipped), 'file')} skipped"
    )
    return 0


@study_action("plot", "scaling plots (time per iteration, speedup, efficiency per mode) and "
                      "noise survey plots (per node, CDF per mode) of a study file")
def _build_study_plot(p: argparse.ArgumentParser) -> None:
    p.add_argument("study_file", metavar="STUDY.h5", help="written by `mckmpi study collect`")
    p.add_argument("--plots", required=True, metavar="DIR", help="directory for the PNG plots")


@_build_study_plot.run
def _cmd_study_plot(args: argparse.Namespace) -> int:
    from mckmpi.analysis import study

    rows = study.read(args.study_file)
    written, notes = study.plot(args.study_file, rows, _plots_dir(args))  # before any output
    print(study.text(rows))
    for note in notes:
        print(note)
    _print_plots(written)
    return 0
