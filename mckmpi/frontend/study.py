"""`mckmpi study plan | submit | status | run`: scaling and noise studies as Slurm jobs.

The actions join `collect` and `plot` under the one `study` command (`@study_action`);
the work lives in `mckmpi.jobs.study`, which these functions call and whose results they print.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from mckmpi.frontend.analysis import study_action
from mckmpi.utility.table import counted, render


@study_action("plan", "write the job scripts and the manifest of a study (checked against "
                      "the cluster first)")
def _build_plan(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = """Write the job scripts of every point (node count x mode x axis values) and a
manifest into DIR.
The plan is checked against the Slurm partition first (its nodes and CPUs per node); what a
point needs beyond the request (--oversubscribe, specialised cores as Linux cores) is added
and shown. Then: mckmpi study submit DIR; mckmpi study status DIR; mckmpi study collect DIR.

  mckmpi study plan --app stencil --nodes 1,2,4 --ranks-per-node 8 --scaling strong \\
      --size 2048 --out results/stencil-strong
  mckmpi study plan --app fwq --nodes 1,2 --ranks-per-node 4 --size 20000 --out results/noise
  mckmpi study plan --app cg --nodes 1,2 --ranks-per-node 2 --scaling weak --local \\
      --out results/cg-weak            (no Slurm: mckmpi study run DIR runs it here)

  mckmpi study plan --app stencil --nodes 1,2 --ranks-per-node 4 --scaling weak --repeats 3 \\
      --axis mem=256M,1G --axis app:--iterations=50,100 --combine zip --out results/sweep
                                   (3 repeats of every point; points of one shape as one job
                                    array; collect gives each point its median and 95% CI)

--size is per app: stencil/cg grid points per axis (weak: per rank, --local of the app;
strong: the global grid, --size), fwq samples per rank, detour seconds of spinning."""
    p.add_argument("--app", required=True, choices=("stencil", "cg", "fwq", "detour"),
                   help="stencil and cg: scaling study; fwq and detour: noise survey")
    p.add_argument("--nodes", required=True, metavar="LIST", help="node counts, e.g. 1,2,4")
    p.add_argument("--ranks-per-node", required=True, type=int, metavar="R",
                   help="ranks on every node")
    p.add_argument("--modes", default="linux,lwk", metavar="LIST",
                   help="linux, lwk or both [linux,lwk]")
    p.add_argument("--scaling", choices=("weak", "strong"), help="stencil and cg: weak or strong")
    p.add_argument("--size", metavar="SIZE", help="problem size (see above; default: the app's)")
    p.add_argument("--partition", metavar="P", help="Slurm partition [the cluster's default]")
    p.add_argument("--time", default="30", metavar="TIME",
                   help="time limit of each job, as sbatch --time takes it [30 minutes]")
    p.add_argument("--mpi", metavar="PLUGIN",
                   help="srun --mpi plugin [pmix when Slurm offers it, else Slurm's default]")
    p.add_argument("--app-args", default="", metavar="ARGS",
                   help="more arguments for the app, e.g. '--iterations 50'")
    p.add_argument("--run-args", default="", metavar="ARGS",
                   help="more mckmpi run options, e.g. '--mem 512M --linux-cores 2' "
                        "(one option alone: --run-args=--oversubscribe)")
    p.add_argument("--sbatch-args", default="", metavar="ARGS",
                   help="more sbatch options for every job, e.g. '--account=proj --qos=debug' "
                        "(one option alone works too: --sbatch-args '--account=proj')")
    p.add_argument("--repeats", type=int, default=1, metavar="K",
                   help="run every point K times; collect gives the median and a 95%% "
                        "interval per metric [1]")
    p.add_argument("--axis", action="append", default=[], metavar="NAME=V1,V2",
                   help="one more axis of the study: a mckmpi run option (mem=256M,1G; a "
                        "switch takes on,off) or an app option (app:--size=1024,2048); "
                        "repeatable")
    p.add_argument("--combine", choices=("cross", "zip"), default="cross",
                   help="axes: every combination of their values, or their values in step "
                        "[cross]")
    p.add_argument("--local", action="store_true",
                   help="plan for this host (mckmpi study run), without Slurm")
    p.add_argument("--out", metavar="DIR",
                   help="study directory [results/study-APP[-SCALING]]")


@_build_plan.run
def _cmd_plan(args: argparse.Namespace) -> int:
    from mckmpi.jobs import study

    req = study.Request(
        app=args.app, nodes=study.parse_nodes(args.nodes), ranks_per_node=args.ranks_per_node,
        modes=study.parse_modes(args.modes), scaling=args.scaling, size=args.size,
        partition=args.partition, time=args.time, mpi=args.mpi,
        app_args=tuple(_split(args.app_args, "--app-args")),
        run_args=tuple(_split(args.run_args, "--run-args")),
        sbatch_args=tuple(_split(args.sbatch_args, "--sbatch-args")), local=args.local,
        repeats=args.repeats, axes=tuple(study.parse_axis(a) for a in args.axis),
        combine=args.combine)
    out = args.out or f"results/study-{args.app}" + (f"-{args.scaling}" if args.scaling else "")
    for level in (Path(out), *Path(out).parents):  # a file in the way: one line, nothing made
        if level.exists() and not level.is_dir():
            raise study.StudyError(f"--out {out}: {level} is a file, not a directory")
    manifest = study.plan(req, out, argv=["mckmpi", *sys.argv[1:]])
    cluster = manifest["cluster"]
    where = (f"Slurm partition {cluster['partition']} ({cluster['nodes']}: "
             f"{cluster['usable_cpus_per_node']} CPUs per node for jobs"
             + (f", specialised CPUs {cluster['spec_cpus']}" if cluster["spec_cpus"] else "")
             + f", srun --mpi={cluster['mpi'] or 'default'})"
             if cluster else "this host (mckmpi study run; Slurm nodes become virtual nodes)")
    rows = [[p["name"], p["mode"], p["nodes"], p["ranks"], p["axes"] or "-", p["repeats"],
             p["script"], shlex.join(p["added"]) or "-"]
            for p in manifest["points"]]
    arrays = sum(1 for j in manifest["jobs"] if len(j["tasks"]) > 1)
    print(render(("point", "mode", "nodes", "ranks", "axes", "repeats", "job script", "added"),
                 rows, title=f"study of {req.app}: {counted(len(rows), 'point')} for {where}"))
    print(counted(len(manifest["jobs"]), "job script")
          + (f" ({counted(arrays, 'job array')}: one task per point and repeat of one shape)"
             if arrays else ""))
    notes: dict[str, list[str]] = {}
    for p in manifest["points"]:
        for note in p["notes"]:
            notes.setdefault(note, []).append(p["name"])
    for note, names in notes.items():
        print(f"note: {note} ({', '.join(names)})")
    directory = manifest["directory"]
    print(f"\nmanifest {directory}/{study.MANIFEST}")
    nxt = "run" if req.local else "submit"
    print(f"next: mckmpi study {nxt} {directory}; then mckmpi study collect {directory} "
          f"-o {directory}/study.h5")
    return 0


def _split(text: str, name: str) -> list[str]:
    from mckmpi.jobs.study import StudyError

    try:
        return shlex.split(text)
    except ValueError as exc:
        raise StudyError(f"{name}: {exc}") from None


@study_action("submit", "submit a planned study with sbatch and record the job ids")
def _build_submit(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", metavar="DIR", help="a study directory written by study plan")
    p.add_argument("--retry", choices=("failed",),
                   help="also submit again every point whose job ended without completing "
                        "(non-zero exit, a signal, TIMEOUT, CANCELLED, NODE_FAIL, "
                        "OUT_OF_MEMORY); earlier jobs stay listed in study.json")


@_build_submit.run
def _cmd_submit(args: argparse.Namespace) -> int:
    from mckmpi.jobs import study

    submitted = study.submit(args.directory, echo=lambda line: print(line, flush=True),
                             retry_failed=args.retry == "failed")
    if not submitted:
        print(f"every point of {args.directory} is already submitted")
    else:
        print(f"{counted(len(submitted), 'job')} submitted; follow them with: mckmpi study status "
              f"{args.directory}")
    return 0


@study_action("status", "state, exit code and log of every job of a study")
def _build_status(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", metavar="DIR", help="a study directory")
    p.add_argument("--wait", type=float, metavar="SECONDS",
                   help="wait until every job has finished (at most SECONDS)")


@_build_status.run
def _cmd_status(args: argparse.Namespace) -> int:
    from mckmpi.jobs import study

    if args.wait is not None:
        states = study.wait(args.directory, args.wait, echo=lambda line: print(line, flush=True))
    else:
        states = study.status(args.directory)
    rows = [[s.name, s.job_id or ("local" if s.backend == "local" else "-"), s.state,
             "-" if s.exit_code is None else s.exit_code, s.ending or "-", s.log or "-",
             s.detail or ""]
            for s in states]
    print(render(("point", "job", "state", "exit", "ending", "log", "note"), rows,
                 title=f"study {Path(args.directory)}: {counted(len(rows), 'point')}"))
    bad = [s for s in states if s.failed]
    waiting = [s for s in states if not s.final]
    if bad:
        print(f"\n{len(bad)} failed: {', '.join(s.name for s in bad)}; submit them again with: "
              f"mckmpi study submit --retry failed {args.directory}")
    if waiting and args.wait is not None:
        print(f"\n{len(waiting)} still running or pending after {args.wait:g} s")
    # A script can tell a healthy study (0) from one with a failure or left-over job (1).
    return 1 if bad or (waiting and args.wait is not None) else 0


@study_action("run", "run a planned study on this host through mpiexec (no Slurm needed)")
def _build_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", metavar="DIR", help="a study directory written by study plan")
    p.add_argument("--timeout", type=float, default=3600.0, metavar="SECONDS",
                   help="stop a point's job after SECONDS [3600]")


@_build_run.run
def _cmd_run(args: argparse.Namespace) -> int:
    from mckmpi.jobs import study

    states = study.run_local(args.directory, echo=lambda line: print(line, flush=True),
                             timeout=args.timeout)
    failed = [s for s in states if not s.ok]
    print(f"{len(states) - len(failed)} of {counted(len(states), 'point')} completed; "
          f"gather them with: mckmpi study collect {args.directory} -o {args.directory}/study.h5")
    return 1 if failed else 0
