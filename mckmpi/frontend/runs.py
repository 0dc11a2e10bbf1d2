"""`mckmpi runs`: the catalogue of runs of a results directory (index, list, query, trend,
export). It parses, calls `mckmpi.analysis.catalogue` and prints; nothing here imports MPI or
the runtime."""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import TYPE_CHECKING

from mckmpi.frontend.registry import command
from mckmpi.utility.table import counted, render

if TYPE_CHECKING:
    from mckmpi.analysis.catalogue import Filters, Trend


def _directory(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", metavar="DIR", nargs="?", default="results",
                   help="results directory whose catalogue (catalogue.sqlite) is used [results]")


def _filters(p: argparse.ArgumentParser) -> None:
    _directory(p)
    g = p.add_argument_group("filters (all must match)")
    g.add_argument("--app", default="", help="app name (fwq, stencil, ...)")
    g.add_argument("--mode", choices=("linux", "lwk"), help="linux or lwk")
    g.add_argument("--host", default="", help="one of the hosts the run used")
    g.add_argument("--cluster", default="", help="Slurm cluster name")
    g.add_argument("--system", default="", help="the cluster, or the hosts where none is known")
    g.add_argument("--commit", default="", help="source commit (a prefix is enough)")
    g.add_argument("--since", default="", metavar="DATE", help="created at or after (ISO: 2026-11-30)")
    g.add_argument("--until", default="", metavar="DATE", help="created before (ISO)")
    g.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                   help="a mckmpi run setting (mem=64M) or app argument (app:--samples=200); "
                        "repeatable")
    g.add_argument("--complete", action="store_true", help="complete runs only (no partial files)")
    g.add_argument("--limit", type=int, default=0, metavar="N", help="at most N runs (oldest first)")


def _make_filters(args: argparse.Namespace) -> Filters:
    from mckmpi.analysis.catalogue import CatalogueError, Filters

    options = {}
    for item in args.option:
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise CatalogueError(f"--option wants NAME=VALUE, got {item!r}")
        options[name] = value
    return Filters(app=args.app, mode=args.mode or "", host=args.host, cluster=args.cluster,
                   system=args.system, commit=args.commit, since=args.since, until=args.until,
                   options=options, complete_only=args.complete, limit=args.limit)


@command(
    "runs",
    "a catalogue of every run of a results directory: index, list, query, trend, export",
    """The runs of a results directory in one SQLite file (DIR/catalogue.sqlite), for questions
across runs. `mckmpi run` adds every run that ends normally to the catalogue of its output
directory; `index` catches up with files copied in or written elsewhere and with runs that
ended otherwise (partial files too).

  mckmpi runs index results                    (new and changed files; partial runs too)
  mckmpi runs list results --app fwq --mode lwk --since 2026-11-01
  mckmpi runs query results --option mem=64M --option app:--samples=3000   (JSON lines)
  mckmpi runs trend fwq_p999_us results --app fwq     (per system and configuration, with
                                                       the noise band of earlier repeats)
  mckmpi runs trend fwq_p999_us results --plots results/plots     (and as a PNG)
  mckmpi runs export results --format parquet -o runs.parquet

Metrics of a complete run: wall_s, iter_us, fwq_p50_us, fwq_p999_us, fwq_max_us, noise_pct,
verified, offload_calls, offload_p50_us (when the run has them).""",
)
def _build_runs(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    ip = sub.add_parser("index", help="add new and changed run files under DIR",
                        description="Add every run file under DIR (recursively; *.h5 and "
                                    "*.h5.partial) that is new or changed since it was indexed; "
                                    "drop entries of files that are gone. Files that are not "
                                    "run files are listed once, skipped and counted.")
    _directory(ip)
    lp = sub.add_parser("list", help="the runs as a table", description="The selected runs "
                        "as a table, oldest first.")
    _filters(lp)
    qp = sub.add_parser("query", help="the runs as JSON lines, with metrics and options",
                        description="The selected runs, one JSON object per line: provenance, "
                                    "metrics, options.")
    _filters(qp)
    tp = sub.add_parser("trend", help="one metric over time per system, with its noise band",
                        description="METRIC over time per system and configuration (same app, "
                                    "mode, shape and options: repeats). Each run is judged "
                                    "against the band of the repeats before it: median +- 3 "
                                    "robust standard deviations (1.4826 x MAD), once there are "
                                    "3; runs outside are flagged high or low.")
    tp.add_argument("metric", metavar="METRIC", help="e.g. fwq_p999_us, iter_us, wall_s")
    _filters(tp)
    tp.add_argument("--plots", metavar="DIR",
                    help="also write a PNG plot into DIR (trend-METRIC.png: the series over "
                         "time, their noise bands, the runs outside marked)")
    ep = sub.add_parser("export", help="the runs as CSV or Parquet",
                        description="The selected runs, one row each: provenance columns, "
                                    "metric:NAME and option:NAME columns.")
    _filters(ep)
    ep.add_argument("--format", choices=("csv", "parquet"), default="csv", help="[csv]")
    ep.add_argument("-o", "--output", required=True, metavar="FILE", help="file to write")


@_build_runs.run
def _cmd_runs(args: argparse.Namespace) -> int:
    from mckmpi.analysis import catalogue
    from mckmpi.utility.outputs import output_dir

    if args.action == "index":
        done = catalogue.index(args.directory)
        for path, reason in done.skipped:
            print(f"skipped  {path}: {reason}", file=sys.stderr)
        print(f"{catalogue.catalogue_path(args.directory)}: {len(done.added)} added, "
              f"{len(done.updated)} updated, {done.unchanged} unchanged, {done.removed} removed, "
              f"{len(done.skipped) + done.skipped_before} skipped")
        return 0
    filters = _make_filters(args)
    if args.action == "list":
        _print_list(catalogue.query(args.directory, filters))
    elif args.action == "query":
        for run in catalogue.query(args.directory, filters):
            print(json.dumps(run, sort_keys=True))
    elif args.action == "trend":
        plots = output_dir(args.plots, "--plots") if args.plots else None
        trends = catalogue.trend(args.directory, args.metric, filters)
        if not trends:
            known = ", ".join(catalogue.metric_names(args.directory)) or "none"
            raise catalogue.CatalogueError(f"no run has metric {args.metric!r} (metrics: {known})")
        _print_trends(args.metric, trends)
        if plots is not None:
            from mckmpi.analysis.plots import trend

            print(f"plot  {trend(args.metric, trends, plots / f'trend-{args.metric}.png')}")
    elif args.action == "export":
        n = catalogue.export(args.directory, args.output, args.format, filters)
        print(f"{args.output}: {counted(n, 'run')}")
    return 0


def _print_list(runs: list[dict]) -> None:
    headline = ("wall_s", "iter_us", "fwq_p999_us", "noise_pct")
    rows = [[r["created"], r["app"], r["mode"], r["ranks"], r["nodes"], r["system"],
             (r["ending"] or "complete") if r["complete"] else "partial",
             *[r["metrics"].get(m, "-") for m in headline], r["path"]] for r in runs]
    print(render(("created", "app", "mode", "ranks", "nodes", "system", "state", *headline,
                  "file"), rows, title=counted(len(runs), 'run')))


def _print_trends(metric: str, trends: list[Trend]) -> None:
    for t in trends:
        rows = [[p.created, p.value,
                 "-" if math.isnan(p.low) else f"{p.low:.4g} .. {p.high:.4g}",
                 p.flag.upper() or "-", p.path] for p in t.points]
        flagged = sum(1 for p in t.points if p.flag)
        print(render(("created", metric, "band of earlier repeats", "outside", "file"), rows,
                     title=f"{t.system}: {t.label} ({counted(len(t.points), 'run')}, "
                           f"{flagged} outside)"))
        print()
