"""Commands of the harness itself: run, partition, info, demo."""

from __future__ import annotations

import argparse
import json
import os
import sys

from mckmpi import config
from mckmpi.errors import UsageError
from mckmpi.frontend.registry import command


# --- run ------------------------------------------------------------------------------------


@command("run", "run one rank of an app inside its partition (use under mpiexec/srun)",
         """Run one rank of APP inside its partition, like McKernel's mcexec. Start one per
rank with your launcher:

  mpiexec -n 4 mckmpi run --mode linux -- apps/fwq.py --samples 1000
  srun -n 4 mckmpi run -- apps/stencil.py
  mckmpi run -- apps/fwq.py            (one rank, no launcher)

Python files and -m modules run in-process (an unhandled exception aborts the whole job);
other executables are exec'd after pinning. One HDF5 run file per job goes to --out.""")
def _build_run(p: argparse.ArgumentParser) -> None:
    config.add_arguments(p, "partition", "lwk", "run")
    p.add_argument("-m", dest="module", metavar="MODULE", help="run a Python module as the app")
    p.add_argument("app", nargs=argparse.REMAINDER, help="-- APP [ARGS...]")


@_build_run.run
def _cmd_run(args: argparse.Namespace) -> int:
    from mckmpi.runner import announces_errors, resolve_app, run

    app_argv = args.app[1:] if args.app[:1] == ["--"] else args.app
    try:
        settings = config.resolve(args, "partition", "lwk", "run")
        app = resolve_app(app_argv, args.module)
        return run(settings, app, ["mckmpi", *sys.argv[1:]])
    except UsageError as exc:
        # Every rank finds the same mistake; one line per node is enough.
        if not announces_errors():
            return exc.exit_code
        raise


# --- partition -----------------------------------------------------------------------------


@command("partition", "show the partition plan of this host",
         """Show how this host's CPUs and memory are split between Linux (service) cores and
LWK cores per rank, with the same options `mckmpi run` takes:

  mckmpi partition show --mode lwk --ranks 4 --oversubscribe
  mckmpi partition show --mode lwk --vnodes 2 --ranks 2 --linux-cores 1 --oversubscribe""")
def _build_partition(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("show",), help="show: print the plan as a table")
    p.add_argument("--ranks", type=int, metavar="N",
                   help="ranks on this host (default: one per available core)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    config.add_arguments(p, "partition")


@_build_partition.run
def _cmd_partition(args: argparse.Namespace) -> int:
    from mckmpi.partition import node_facts, plan_node, read_host
    from mckmpi.utility.table import render
    from mckmpi.utility.units import format_cpulist, format_size

    s = config.resolve(args, "partition")
    host = read_host()
    k = s.vnodes
    slices = [node_facts(host, k, v) for v in range(k)]
    if args.ranks is not None and args.ranks < 1:
        raise UsageError(f"--ranks must be at least 1, got {args.ranks}")
    total = args.ranks
    plans = []
    for v, facts in enumerate(slices):
        if total is None:
            n = len(facts.cpus) if s.mode == "linux" else max(1, len(facts.cpus) - _count(s.linux_cores))
        else:
            n = -(-(v + 1) * total // k) - -(-v * total // k)
        plans.append(plan_node(facts, n, mode=s.mode, linux_cores=s.linux_cores, lwk_cores=s.lwk_cores,
                               mem=s.mem, oversubscribe=s.oversubscribe))
    if args.json:
        print(json.dumps([_plan_json(v, p) for v, p in enumerate(plans)], indent=2))
        return 0
    rows = []
    for v, plan in enumerate(plans):
        for r in plan.ranks:
            rows.append((v, r.local_rank, format_cpulist(r.cpus), format_cpulist(plan.linux_cpus),
                         r.numa_node, format_size(r.mem) if r.mem else "-"))
    print(render(("vnode", "local rank", "cpus", "linux cpus", "numa", "mem"), rows,
                 title=f"partition of {os.uname().nodename}, mode {s.mode}"))
    for v, plan in enumerate(plans):
        print(f"vnode {v}: {plan.describe()}")
    return 0


def _count(spec: str) -> int:
    from mckmpi.utility.units import parse_cpulist

    return int(spec) if str(spec).isdigit() else len(parse_cpulist(spec))


def _plan_json(vnode: int, plan: object) -> dict:
    from dataclasses import asdict

    d = asdict(plan)  # type: ignore[call-overload]
    d["vnode"] = vnode
    return d


# --- info ----------------------------------------------------------------------------------


@command("info", "what this node offers: versions, MPI, parallel HDF5, seccomp, limits")
def _build_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print as JSON")


@_build_info.run
def _cmd_info(args: argparse.Namespace) -> int:
    from mckmpi.info import gather

    facts = gather()
    if args.json:
        print(json.dumps(facts, indent=2, default=str))
        return 0
    for section, values in facts.items():
        print(f"[{section}]")
        width = max(len(k) for k in values)
        for k, v in values.items():
            print(f"  {k.ljust(width)}  {v}")
    return 0


# --- demo ----------------------------------------------------------------------------------


@command("demo", "the main job: a small study on this host, with its report",
         """Run the demo: a 2-rank job of the FWQ noise benchmark through `mckmpi run`
under mpiexec, then the report of its run file.""")
def _build_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="results/demo", help="directory for run files [results/demo]")
    p.add_argument("--samples", type=int, default=2000, help="FWQ samples per rank [2000]")


@_build_demo.run
def _cmd_demo(args: argparse.Namespace) -> int:
    from mckmpi.demo import demo

    return demo(args.out, samples=args.samples)
