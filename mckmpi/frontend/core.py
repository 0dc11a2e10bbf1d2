"""Commands of the harness itself: run, partition, info, demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from collections.abc import Callable
from typing import Any, TypeVar

from mckmpi import config
from mckmpi.errors import MckmpiError, PartitionError, UsageError
from mckmpi.frontend.registry import command
from mckmpi.node.partition import node_facts, plan_node
from mckmpi.node.host import read_host

T = TypeVar("T")


# --- run ------------------------------------------------------------------------------------


@command("run", "run one rank of an app inside its partition (use under mpiexec/srun)",
         """Run one rank of APP inside its partition, like McKernel's mcexec. Start one per
rank with your launcher:

  mpiexec -n 4 mckmpi run --mode linux -- apps/fwq.py --samples 1000
  srun -n 4 mckmpi run -- apps/stencil.py
  mckmpi run -- apps/fwq.py            (one rank, no launcher)

Python files and -m modules run in-process (an unhandled exception aborts the whole job);
other executables run as the rank's child (pinned, offloaded, traced; a failure aborts the
job); an MPI executable runs as the rank's child after pinning, and its run file holds its
placement, time and exit only. One HDF5 run file per job goes to --out.

An app's exit status N becomes mckmpi's (as srun and mpiexec pass a task's on), said in one
line `mckmpi: rank R: APP exited with status N`; mckmpi's own mistakes are the lines
`mckmpi: error: ...` (status 2: the command; 1: the run).""")
def _build_run(p: argparse.ArgumentParser) -> None:
    config.add_arguments(p, *config.RUN_SECTIONS)
    p.add_argument("-m", dest="module", metavar="MODULE", help="run a Python module as the app")
    p.add_argument("app", nargs=argparse.REMAINDER, help="-- APP [ARGS...]")


@_build_run.run
def _cmd_run(args: argparse.Namespace) -> int:
    from mckmpi.app import resolve_app
    from mckmpi.runner import refuse, run

    app_argv = args.app[1:] if args.app[:1] == ["--"] else args.app
    try:
        settings = config.resolve(args, *config.RUN_SECTIONS)
        app = resolve_app(app_argv, args.module)
        return run(settings, app, ["mckmpi", *sys.argv[1:]])
    except MckmpiError as exc:
        return refuse(exc)  # every rank finds the same mistake: one line per node


# --- partition -----------------------------------------------------------------------------


@command("partition", "show, reserve or release this host's partition",
         """Show how this host's CPUs and memory are split between Linux (service) cores and
LWK cores per rank, with the same options `mckmpi run` takes; as root, reserve the split as
cpuset cgroups (IHK's reserve) and release it again:

  mckmpi partition show --mode lwk --ranks 4 --oversubscribe
  mckmpi partition show --mode lwk --vnodes 2 --ranks 2 --linux-cores 1 --oversubscribe
  mckmpi partition reserve --linux-cores 1          # cpusets NAME/linux and NAME/lwk
  mpiexec -n 1 mckmpi run --mode lwk --cpuset mckmpi -- apps/fwq.py
  mckmpi partition status
  mckmpi partition release                          # undoes exactly what reserve changed

Only processes mckmpi starts are moved into the cpusets, unless reserve is given
--system-wide (then every movable task of the parent cgroup goes to the Linux side).
reserve also isolates the LWK cores (unless --no-isolate): device IRQs, unbound workqueues
and movable kernel threads go to the Linux cores, load balancing stops on the LWK cpuset,
and no core of the reservation enters an idle state with an exit latency; IRQs that refuse
are listed with the reason, and the kernel parameters only a reboot can set are printed.
release works from the state files reserve wrote, also after a crash.""")
def _build_partition(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("show", "reserve", "release", "status"),
                   help="show the plan; reserve/release/status of cpuset cgroups (root)")
    p.add_argument("--ranks", type=int, metavar="N",
                   help="show: ranks on this host (default: one per available core)")
    p.add_argument("--json", action="store_true", help="show, status: print JSON")
    p.add_argument("--name", default="mckmpi",
                   help="reserve, release, status: the reservation's name [mckmpi]")
    p.add_argument("--system-wide", action="store_true",
                   help="reserve: also move every other task of the parent cgroup to the Linux side")
    p.add_argument("--no-isolate", action="store_true",
                   help="reserve: cpusets only; leave IRQs, workqueues, kernel threads, load "
                        "balancing and idle states as they are")
    p.add_argument("--cgroup", type=int, choices=(1, 2),
                   help="reserve: cgroup version to use (default: the one with a cpuset controller)")
    config.add_arguments(p, "partition")


@_build_partition.run
def _cmd_partition(args: argparse.Namespace) -> int:
    if args.action == "show":
        return _partition_show(args)
    from mckmpi.node import isolation, reservation

    if args.action == "reserve":
        s = config.resolve(args, "partition")
        host = read_host()
        linux = _blamed(s, plan_node, host, 1, mode="lwk", linux_cores=s.linux_cores,
                        lwk_cores=s.lwk_cores, mem=s.mem, oversubscribe=True)
        r, quiet = reservation.reserve(linux.linux_cpus, linux.lwk_cpus, name=args.name,
                                       system_wide=args.system_wide, isolate=not args.no_isolate,
                                       cgroup=args.cgroup)
        print(f"reserved {r.describe()}")
        if quiet is not None:
            print(quiet.describe())
        print(isolation.describe_boot(isolation.boot_advice(r.linux_cpus, r.lwk_cpus)))
        return 0
    if args.action == "release":
        summaries = reservation.release(args.name)
        for summary in summaries:
            print(summary.describe())
        return 0 if all(summary.ok for summary in summaries) else 1
    found = reservation.status(args.name if args.name != "mckmpi" else None)
    if args.json:
        print(json.dumps([f.as_dict() for f in found], indent=2, default=str))
        return 0
    if not found:
        print("no cpuset reservations")
    for f in found:
        print(f.describe())
    return 0


def _partition_show(args: argparse.Namespace) -> int:
    from mckmpi.runner import vnode_plan
    from mckmpi.utility.table import render
    from mckmpi.utility.units import format_cpulist, format_size

    s = config.resolve(args, "partition")
    if args.ranks is not None and args.ranks < 1:
        raise UsageError(f"--ranks must be at least 1, got {args.ranks}")
    k = s.vnodes
    plans = []
    for v in range(k):
        if args.ranks is None:
            facts = _blamed(s, node_facts, read_host(), k, v)
            n = len(facts.cpus) if s.mode == "linux" else max(1, len(facts.cpus) - _count(s.linux_cores))
        else:
            n = -(-(v + 1) * args.ranks // k) - -(-v * args.ranks // k)
        plans.append(vnode_plan(s, v, n))
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


def _blamed(settings: config.Settings, plan: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`plan(...)`, whose PartitionError also says where the options it names came from."""
    try:
        return plan(*args, **kwargs)
    except PartitionError as exc:
        raise PartitionError(settings.blame(str(exc))) from None


def _count(spec: str) -> int:
    from mckmpi.utility.units import parse_cpulist

    text = str(spec).strip()
    return int(text) if text.isascii() and text.isdigit() else len(parse_cpulist(text))


def _plan_json(vnode: int, plan: object) -> dict:
    from dataclasses import asdict

    d = asdict(plan)  # type: ignore[call-overload]
    d["vnode"] = vnode
    return d


# --- info ----------------------------------------------------------------------------------


@command("info", "what this node offers: versions, MPI, parallel HDF5, seccomp, limits")
def _build_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.add_argument("--offload-load", type=float, metavar="RATE",
                   help="instead: how many ranks of RATE offloaded calls/s one Linux core's "
                        "proxy serves, and the --linux-cores a node needs, from the last "
                        "`mckmpi bench offload` in --results (else the reference numbers)")
    p.add_argument("--cores", type=int, default=None,
                   help="with --offload-load: CPUs of the node [this node's]")
    p.add_argument("--results", default="results",
                   help="with --offload-load: where the last benchmark wrote [results]")


@_build_info.run
def _cmd_info(args: argparse.Namespace) -> int:
    if args.offload_load is not None:
        return _offload_load(args)
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


def _offload_load(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from mckmpi.analysis.capacity import CapacityError, describe, measured_cost, project

    try:
        cost, path, origin = measured_cost(Path(args.results))
        cores = args.cores if args.cores is not None else len(os.sched_getaffinity(0))
        projection = project(args.offload_load, cores, cost, source=str(path), origin=origin)
    except CapacityError as e:
        raise UsageError(str(e)) from None
    if args.json:
        print(json.dumps(asdict(projection), indent=2))
    else:
        print("\n".join(describe(projection)))
    return 0


# --- demo ----------------------------------------------------------------------------------


@command("demo", "the main job: a Linux-vs-LWK study on this host, with its report",
         """Run the demo study: FWQ, selfish detour and the stencil, each in linux mode and
in lwk mode under the same background noise (2 ms of CPU every 10 ms plus small writes;
anywhere in linux mode, confined to the Linux core in lwk mode), then the comparison of
each pair, plots and summary.json in --out. As root the lwk runs isolate their LWK cores
and each also runs without isolation (a third column). About a minute on a 2-core host.""")
def _build_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="results/demo", help="directory for run files and plots [results/demo]")
    p.add_argument("--samples", type=int, default=3000, help="FWQ samples per rank (1 ms each) [3000]")
    p.add_argument("--detour-s", type=float, default=3.0, help="seconds of selfish detour per run [3]")


@_build_demo.run
def _cmd_demo(args: argparse.Namespace) -> int:
    from mckmpi.demo import demo

    from mckmpi.utility.outputs import output_dir

    if not 1 <= args.samples <= DEMO_MAX_SAMPLES:
        raise UsageError(f"--samples must be from 1 to {DEMO_MAX_SAMPLES:,} (1 ms each), "
                         f"got {args.samples}")
    if not 0 < args.detour_s <= DEMO_MAX_DETOUR_S:
        raise UsageError(f"--detour-s must be more than 0 and at most {DEMO_MAX_DETOUR_S:g} "
                         f"seconds, got {args.detour_s:g}")
    output_dir(args.out, "--out")  # a file or an unwritable place, found before the runs
    return demo(args.out, samples=args.samples, detour_s=args.detour_s)


#: Bounds of the demo's runs: a day of FWQ samples, an hour of detour (the arrays of a run
#: are held in memory: 10^8 samples are 800 MB per rank).
DEMO_MAX_SAMPLES = 86_400_000
DEMO_MAX_DETOUR_S = 3600.0
