"""Study plans: one app over node counts and modes, as Slurm jobs or as local runs.

`plan` checks the request against the cluster (partition, nodes, CPUs per node) before
anything exists, then writes one job script per point, rendered from the templates in
slurm/, and a manifest (`study.json`) into the study directory. `submit` hands the scripts
to sbatch and records the job ids; `status` reads each job's state, exit code and log back
from Slurm; `run_local` executes the same points on this host as `Job`s through mpiexec,
each Slurm node becoming a virtual node (`mckmpi run --vnodes`); `status` reports the points
of either kind as `PointState`s. Every run file lands in DIR/runs, so
`mckmpi study collect DIR` gathers the study.

A study directory::

    study.json                          the manifest: request, cluster facts, points, job ids
    jobs/<point>.sbatch                 one job script per point
    logs/<point>-<jobid>.out            Slurm's output of each job (<point>-local.out: study run)
    runs/<app>-<mode>-job<id>.<step>.h5 run files (<point>-local.h5: study run)

What a point needs beyond the request is decided here, shown by `plan` and recorded in the
manifest: `--oversubscribe` when its ranks outnumber the cores of their side, the
specialised cores (Slurm core specialisation) as the Linux cores of lwk jobs; and a note
when `--rank-policy fifo` is asked for on Slurm nodes that share one host.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from string import Template
from typing import Any

from mckmpi import config
from mckmpi.errors import PartitionError, UsageError, did_you_mean
from mckmpi.jobs import slurm
from mckmpi.jobs.launchers import Job, Launch, job_env
from mckmpi.node.host import NodeFacts, read_host
from mckmpi.node.partition import core_spec_linux_cores, node_facts, plan_node
from mckmpi.utility.units import format_cpulist, parse_cpulist
from mckmpi.utility.table import counted

SCHEMA = "mckmpi.study-plan"
VERSION = 2
MANIFEST = "study.json"
TEMPLATES = Path(__file__).resolve().parents[2] / "slurm"
APPS_DIR = Path(__file__).resolve().parents[2] / "apps"
MODES = ("linux", "lwk")
SCALING_APPS = ("stencil", "cg")
#: The app option that --size sets: noise benchmarks measure for longer, mini-apps compute more.
SIZE_OPTION = {"fwq": "--samples", "detour": "--duration-s"}
#: `mckmpi run` options the plan sets itself for every point.
OWN_RUN_OPTIONS = ("mode", "out", "vnodes")
#: sbatch options the plan sets itself in every job script.
OWN_SBATCH_OPTIONS = ("-o", "--output", "-e", "--error", "-D", "--chdir", "-J", "--job-name",
                      "-N", "--nodes", "--ntasks-per-node", "-p", "--partition", "-t", "--time",
                      "-a", "--array")
_SAFE_PATH = re.compile(r"[^\w@%+=:,./-]")  # characters a job script directive cannot carry


class StudyError(UsageError):
    """A study request or directory that cannot be used as it is."""


@dataclass(frozen=True)
class Axis:
    """One study axis: a `mckmpi run` option (target 'run') or an app option ('app') and
    the values it takes, e.g. --axis mem=256M,1G or --axis app:--size=1024,2048."""

    target: str
    option: str  # as given on the command line: --mem, --size
    values: tuple[str, ...]
    switch: bool = False  # a mckmpi run switch (--oversubscribe): values on/off

    @property
    def label(self) -> str:
        return self.option.lstrip("-").replace("_", "-")

    def args(self, value: str) -> list[str]:
        if self.switch:
            return [self.option] if value == "on" else []
        return [f"{self.option}={value}"]


@dataclass(frozen=True)
class Request:
    """What the user asked `study plan` for."""

    app: str
    nodes: tuple[int, ...]
    ranks_per_node: int
    modes: tuple[str, ...] = MODES
    scaling: str | None = None
    size: str | None = None
    partition: str | None = None
    time: str = "30"
    mpi: str | None = None
    app_args: tuple[str, ...] = ()
    run_args: tuple[str, ...] = ()
    sbatch_args: tuple[str, ...] = ()
    local: bool = False
    repeats: int = 1
    axes: tuple[Axis, ...] = ()
    combine: str = "cross"  # "cross": every combination of the axes' values; "zip": in step


@dataclass(frozen=True)
class Cluster:
    """The facts of a Slurm cluster a plan is checked against."""

    partition: str
    nodelist: str
    nodes: tuple[slurm.NodeInfo, ...]
    allow_spec_usage: bool
    mpi_plugins: tuple[str, ...]
    task_plugin: str = ""

    @property
    def usable_cpus(self) -> int:
        """CPUs every node of the partition can give a job (the smallest node decides)."""
        return min(n.usable_cpus for n in self.nodes)

    @property
    def spec_cpus(self) -> tuple[int, ...] | None:
        """The specialised CPUs when every node has the same ones, else None."""
        lists = {n.spec_cpus for n in self.nodes}
        return lists.pop() if len(lists) == 1 else None

    @property
    def shared_hosts(self) -> bool:
        """Whether several Slurm nodes run on one host (test clusters do)."""
        return len({n.hostname for n in self.nodes}) < len(self.nodes)


@dataclass
class Adjusted:
    """Options a point gets beyond the request, with the reasons shown to the user."""

    run_args: list[str] = field(default_factory=list)
    sbatch: list[str] = field(default_factory=list)
    oversubscribe: bool = False
    notes: list[str] = field(default_factory=list)


# --- parsing the request ---------------------------------------------------------------------


def parse_nodes(text: str) -> tuple[int, ...]:
    """'1,2,4' -> (1, 2, 4): node counts, each at least 1, sorted and unique."""
    try:
        counts = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise StudyError(f"--nodes wants node counts such as 1,2,4, got {text!r}") from None
    if not counts or counts[0] < 1:
        raise StudyError(f"--nodes wants node counts of at least 1, got {text!r}")
    return tuple(counts)


def parse_modes(text: str) -> tuple[str, ...]:
    """'linux,lwk' -> ('linux', 'lwk'), in the order given."""
    modes = tuple(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise StudyError(f"--modes wants linux, lwk or both (linux,lwk), got {text!r}")
    return modes


def parse_axis(text: str) -> Axis:
    """'mem=256M,1G' (a `mckmpi run` option) or 'app:--size=1024,2048' (an app option)."""
    target, rest = ("app", text[4:]) if text.startswith("app:") else ("run", text)
    name, sep, values = rest.partition("=")
    parts = tuple(v.strip() for v in values.split(",") if v.strip())
    if not sep or not name.strip("-") or not parts:
        raise StudyError(f"--axis wants NAME=V1,V2 (a mckmpi run option, e.g. mem=256M,1G) or "
                         f"app:--OPTION=V1,V2 (an app option), got {text!r}")
    if len(set(parts)) != len(parts):
        raise StudyError(f"--axis {text!r}: a value is given twice")
    name = name.strip()
    if target == "run":
        option = "--" + name.lstrip("-").replace("_", "-")
        known = {f: o for o in config.options("partition", "lwk", "run") for f in o.cli_flags}
        if option not in known:
            hint = did_you_mean(option[2:], [k[2:] for k in known])
            app_form = "" if hint else f"; an option of the app is app:--{name.lstrip('-')}=V1,V2"
            raise StudyError(f"--axis {name}: not an option of mckmpi run{hint} (known: "
                             f"{', '.join(sorted(k.lstrip('-') for k in known))}{app_form})")
        if known[option].name in OWN_RUN_OPTIONS:
            raise StudyError(f"--axis {name}: set by the plan for every point")
        if known[option].flag:
            if set(parts) - {"on", "off"}:
                raise StudyError(f"--axis {name}: a switch takes the values on and off")
            return Axis(target, option, parts, switch=True)
        for value in parts:  # a bad value is named by the option the user typed, --axis
            try:
                known[option].convert(value, f"--axis {name}")
            except UsageError as exc:
                raise StudyError(str(exc)) from None
    else:
        if not name.startswith("-"):
            raise StudyError(f"--axis {text!r}: an app axis names the app's option, e.g. "
                             "app:--size=1024,2048")
        option = name
    return Axis(target, option, parts)


def axis_points(axes: Sequence[Axis], combine: str) -> list[tuple[str, ...]]:
    """The value combinations of the axes: their cross product, or zipped (same lengths)."""
    if not axes:
        return [()]
    if combine == "zip":
        lengths = {len(a.values) for a in axes}
        if len(lengths) != 1:
            raise StudyError("--combine zip needs axes with the same number of values (got "
                             + ", ".join(f"{a.label}: {len(a.values)}" for a in axes) + ")")
        return list(zip(*(a.values for a in axes), strict=True))
    return list(itertools.product(*(a.values for a in axes)))


def axis_suffix(axes: Sequence[Axis], values: Sequence[str]) -> str:
    """The part of a point name its axis values make: 'mem256M-size1024'."""
    return "-".join(re.sub(r"[^\w.+]", "", f"{a.label}{v}") for a, v in zip(axes, values))


def axis_text(axes: Sequence[Axis], values: Sequence[str]) -> str:
    """Axis values as recorded in run files and study tables: 'mem=256M app:--size=1024'."""
    return " ".join(f"{'app:' if a.target == 'app' else ''}{a.option.lstrip('-') if a.target == 'run' else a.option}={v}"
                    for a, v in zip(axes, values))


def check_app_args(app_path: str | os.PathLike[str], args: Sequence[str],
                   timeout: float = 60.0) -> None:
    """The app's own parser on `args`, in a child process that never initialises MPI, so a
    typo is found at plan time, not by every queued job."""
    code = ("import sys, runpy, mpi4py\n"
            "mpi4py.rc.initialize = mpi4py.rc.finalize = False\n"
            "runpy.run_path(sys.argv[1], run_name='mckmpi_check')['parse'](sys.argv[2:])\n")
    try:
        res = subprocess.run([sys.executable, "-c", code, str(app_path), *args],
                             capture_output=True, text=True, timeout=timeout, check=False,
                             env=job_env())
    except subprocess.TimeoutExpired:
        raise StudyError(f"checking the app's arguments took over {timeout:g} s") from None
    if res.returncode != 0:
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        why = next((ln for ln in reversed(lines) if "error:" in ln), lines[-1] if lines else "")
        raise StudyError(f"app arguments {shlex.join(args)!r} refused by "
                         f"{Path(app_path).name}: {why.split('error:', 1)[-1].strip()}")


def parse_run_args(args: Sequence[str]) -> dict[str, Any]:
    """The `mckmpi run` options in --run-args, checked and converted (name -> value)."""
    parser = argparse.ArgumentParser(prog="--run-args", add_help=False, exit_on_error=False)
    config.add_arguments(parser, *config.RUN_SECTIONS)
    try:
        ns, extra = parser.parse_known_args(list(args))
    except argparse.ArgumentError as exc:
        raise StudyError(f"--run-args: {exc}") from None
    if extra:
        flags = [f for o in config.options(*config.RUN_SECTIONS) for f in o.cli_flags]
        hint = next(filter(None, (did_you_mean(t.split("=", 1)[0], flags, "--")
                                  for t in extra if t.startswith("--"))), "")
        raise StudyError(f"--run-args: not options of mckmpi run: {shlex.join(extra)}{hint}")
    own = [f"--{n.replace('_', '-')}" for n in OWN_RUN_OPTIONS if n in vars(ns)]
    if own:
        raise StudyError(f"--run-args: {', '.join(own)} is set by the plan for every point")
    opts = {o.name: o for o in config.options(*config.RUN_SECTIONS)}
    try:
        return {name: opts[name].convert(raw, "--run-args") for name, raw in vars(ns).items()}
    except UsageError as exc:
        msg = str(exc)
        raise StudyError(msg if msg.startswith("--run-args") else f"--run-args: {msg}") from None


#: The most runs (points x repeats) one study plans: each is a job or an array task, and
#: Slurm refuses larger job arrays by default (MaxArraySize 1001).
MAX_RUNS = 1000
#: sbatch --time: minutes, minutes:seconds, hours:minutes:seconds, days-hours,
#: days-hours:minutes, days-hours:minutes:seconds, or no limit.
_SLURM_TIME = re.compile(r"\d+(:\d+){0,2}|\d+-\d+(:\d+){0,2}|UNLIMITED|INFINITE|unlimited|infinite")


def check_request(req: Request) -> None:
    """Mistakes visible without a cluster: one clear line each."""
    if req.app not in SCALING_APPS and req.app not in SIZE_OPTION:
        raise StudyError(f"unknown study app {req.app!r} (known: "
                         f"{', '.join(SCALING_APPS + tuple(SIZE_OPTION))})")
    if req.app in SCALING_APPS and req.scaling not in ("weak", "strong"):
        raise StudyError(f"--scaling weak or strong is needed for a {req.app} study")
    if req.app in SIZE_OPTION and req.scaling is not None:
        raise StudyError(f"--scaling is for stencil and cg; {req.app} is a noise survey")
    if req.ranks_per_node < 1:
        raise StudyError(f"--ranks-per-node must be at least 1, got {req.ranks_per_node}")
    if not (APPS_DIR / f"{req.app}.py").is_file():
        raise StudyError(f"app {req.app} not found at {APPS_DIR}: run from a source checkout")
    if not 1 <= req.repeats <= MAX_RUNS:
        raise StudyError(f"--repeats must be from 1 to {MAX_RUNS}, got {req.repeats}")
    if not _SLURM_TIME.fullmatch(req.time.strip()):
        raise StudyError(f"--time {req.time!r} is not a Slurm time limit (MINUTES, MM:SS, "
                         "HH:MM:SS, DAYS-HH, DAYS-HH:MM[:SS] or UNLIMITED)")
    if req.combine not in ("cross", "zip"):
        raise StudyError(f"--combine cross or zip, got {req.combine!r}")
    labels = [a.label for a in req.axes]
    if len(set(labels)) != len(labels):
        raise StudyError("--axis: an option is given as two axes")
    owned = [a for a in req.sbatch_args if a.split("=", 1)[0] in OWN_SBATCH_OPTIONS]
    if owned:
        raise StudyError(f"--sbatch-args: {owned[0].split('=', 1)[0]} is set by the plan "
                         "(use --partition, --nodes, --ranks-per-node, --time)")


def app_args(req: Request) -> list[str]:
    """The app's command-line arguments for every point of the study."""
    args = []
    if req.app in SCALING_APPS:
        args += ["--scaling", str(req.scaling)]
        if req.size:
            args += ["--local" if req.scaling == "weak" else "--size", req.size]
    elif req.size:
        args += [SIZE_OPTION[req.app], req.size]
    return args + list(req.app_args)


def point_name(app: str, scaling: str | None, mode: str, nodes: int) -> str:
    return "-".join(p for p in (app, scaling, mode, f"n{nodes}") if p)


# --- the cluster -------------------------------------------------------------------------------


def probe_cluster(partition: str | None, env: Mapping[str, str] | None = None) -> Cluster:
    """Facts of the partition (default: the cluster's default partition) from Slurm itself."""
    environ = os.environ if env is None else env
    local = "plan with --local to run the study on this host (mckmpi study run)"
    missing = [c for c in ("sbatch", "scontrol")
               if shutil.which(c, path=environ.get("PATH", os.defpath)) is None]
    if missing:
        raise slurm.SlurmNotFound(f"no Slurm found: {' and '.join(missing)} not on PATH; {local}")
    conf_file = environ.get("SLURM_CONF")
    if conf_file and not os.path.isfile(conf_file):
        raise slurm.SlurmNotFound(f"no Slurm found: SLURM_CONF names a missing file "
                                  f"{conf_file}; {local}")
    if not slurm.slurm_available(env):
        raise slurm.SlurmNotFound("no Slurm found: no controller answers `scontrol ping` (is "
                                  f"SLURM_CONF set?); {local}")
    chosen = choose_partition(slurm.partitions(env), partition)
    conf = slurm.config(env)
    try:
        plugins = tuple(slurm.mpi_plugins(env))
    except slurm.SlurmError:
        plugins = ()  # an old srun without --mpi=list: jobs use the cluster's MpiDefault
    return Cluster(partition=chosen.name, nodelist=chosen.nodes,
                   nodes=tuple(slurm.nodes(chosen.nodes, env)),
                   allow_spec_usage=conf.get("AllowSpecResourcesUsage", "").lower()
                   in ("yes", "1"),
                   mpi_plugins=plugins, task_plugin=conf.get("TaskPlugin", ""))


def choose_partition(parts: Sequence[slurm.PartitionInfo], name: str | None) -> slurm.PartitionInfo:
    """The named partition, or the default one; an unknown name is a clear error."""
    known = ", ".join(p.name for p in parts) or "none"
    if name is None:
        for p in parts:
            if p.default:
                return p
        raise StudyError(f"this cluster has no default partition: give --partition "
                         f"(known: {known})")
    for p in parts:
        if p.name == name:
            return p
    raise StudyError(f"unknown Slurm partition {name!r} (known: {known})")


def check_fit(req: Request, cluster: Cluster) -> None:
    """The plan must fit the partition: enough nodes, no more ranks per node than CPUs."""
    if not cluster.nodes:
        raise StudyError(f"partition {cluster.partition} has no nodes")
    if max(req.nodes) > len(cluster.nodes):
        raise StudyError(f"--nodes {max(req.nodes)} exceeds the {len(cluster.nodes)} nodes of "
                         f"partition {cluster.partition} ({cluster.nodelist})")
    if req.ranks_per_node > cluster.usable_cpus:
        spec = f" ({cluster.nodes[0].cpus} minus specialised cores)" if cluster.spec_cpus else ""
        raise StudyError(f"--ranks-per-node {req.ranks_per_node} exceeds the {cluster.usable_cpus} "
                         f"CPUs per node{spec} that partition {cluster.partition} "
                         f"({cluster.nodelist}) gives a job")


def mpi_plugin(req: Request, cluster: Cluster) -> str | None:
    """`srun --mpi=` for the jobs: as asked, else pmix when offered (what Open MPI needs)."""
    if req.mpi:
        if cluster.mpi_plugins and req.mpi not in cluster.mpi_plugins:
            raise StudyError(f"--mpi {req.mpi}: this Slurm offers {', '.join(cluster.mpi_plugins)}")
        return req.mpi
    return "pmix" if "pmix" in cluster.mpi_plugins else None


def slurm_adjust(mode: str, rpn: int, cluster: Cluster, given: Mapping[str, Any]) -> Adjusted:
    """What an lwk point needs on this cluster beyond the request (linux points run as is).

    Core specialisation: when the cluster lets jobs ask for the specialised cores
    (AllowSpecResourcesUsage=YES), lwk jobs ask for them (--core-spec=0) and make them their
    Linux cores, so the proxy shares them with slurmd and the system daemons and every other
    core runs ranks; linux jobs leave them to the system, so both modes run ranks on the same
    cores.
    """
    adj = Adjusted()
    if mode != "lwk":
        return adj
    cpus, linux = cluster.usable_cpus, linux_count(given.get("linux_cores", "1"))
    spec = cluster.spec_cpus
    if spec and "linux_cores" not in given and "lwk_cores" not in given:
        if cluster.allow_spec_usage:
            whole = NodeFacts(cpus=tuple(range(min(n.cpus for n in cluster.nodes))))
            chosen = core_spec_linux_cores(whole, spec)
            if chosen:
                cpus, linux = len(whole.cpus), len(chosen)
                linux_cores = cpu_list_arg(chosen)
                adj.sbatch.append("--core-spec=0")
                adj.run_args += ["--linux-cores", linux_cores]
                adj.notes.append(f"specialised CPUs {format_cpulist(chosen)} (CPUSpecList) are "
                                 "the Linux cores: job asks for them with --core-spec=0")
        else:
            adj.notes.append(f"Slurm keeps specialised CPUs {format_cpulist(spec)} from jobs "
                             "(AllowSpecResourcesUsage=No): Linux cores come from the job's CPUs")
    elif spec is None:
        adj.notes.append(f"nodes of partition {cluster.partition} differ in their specialised "
                         "CPUs: Linux cores come from the job's CPUs")
    lwk = len(given["lwk_cores"]) if given.get("lwk_cores") else cpus - linux
    if rpn > lwk and not given.get("oversubscribe"):
        adj.oversubscribe = True
        adj.run_args.append("--oversubscribe")
        adj.notes.append(f"--oversubscribe added: {rpn} ranks per node but {max(lwk, 0)} LWK "
                         f"cores ({cpus} CPUs, {linux} kept for Linux)")
    if cluster.shared_hosts and given.get("rank_policy") == "fifo":
        adj.notes.append("--rank-policy fifo on nodes that share one host: SCHED_FIFO ranks of "
                         "different nodes may spin on one CPU and starve each other")
    return adj


def linux_count(spec: str | Sequence[int]) -> int:
    """How many Linux cores a --linux-cores value keeps (a count, or a CPU list)."""
    if isinstance(spec, str):
        return int(spec) if spec.strip().isdigit() else len(parse_cpulist(spec))
    return len(spec)


def cpu_list_arg(cpus: Sequence[int]) -> str:
    """A CPU list as --linux-cores reads it (a lone number there is a count: CPU 3 is '3-3')."""
    text = format_cpulist(cpus)
    return f"{text}-{text}" if text.isdigit() else text


# --- plan ---------------------------------------------------------------------------------


def plan(req: Request, out: str | os.PathLike[str], env: Mapping[str, str] | None = None,
         argv: Sequence[str] = ()) -> dict[str, Any]:
    """Check the request, then write the job scripts and the manifest into `out`.

    Points are modes x node counts x the axes' value combinations, each run `repeats` times.
    On Slurm the runs of one shape (mode, node count, what the plan adds) are one job
    array, one task per (point, repeat), so a study of many points is a few submissions."""
    check_request(req)
    study_dir = Path(out).absolute()
    if _SAFE_PATH.search(str(study_dir)):
        raise StudyError(f"study directory {study_dir}: use a path without spaces, quotes or "
                         "shell characters (job script directives cannot quote it)")
    if (study_dir / MANIFEST).exists():
        raise StudyError(f"{study_dir} already holds a study ({MANIFEST}): choose another --out")
    values = [len(a.values) for a in req.axes]
    combos_count = math.prod(values) if req.combine == "cross" else min(values, default=1)
    runs = len(req.modes) * len(req.nodes) * combos_count * req.repeats
    if runs > MAX_RUNS:
        raise StudyError(f"the study has {runs:,} runs (modes x node counts x axis values x "
                         f"repeats), more than {MAX_RUNS}: plan it as several studies")
    combos = axis_points(req.axes, req.combine)
    variants = []  # (axis values, run args, app args, given) per combination
    for values in combos:
        run_args = list(req.run_args) + [a for ax, v in zip(req.axes, values) if ax.target == "run"
                                         for a in ax.args(v)]
        args = app_args(req) + [a for ax, v in zip(req.axes, values) if ax.target == "app"
                                for a in ax.args(v)]
        variants.append((values, run_args, args, parse_run_args(run_args)))
    app_path = APPS_DIR / f"{req.app}.py"
    for args in dict.fromkeys(tuple(v[2]) for v in variants):
        check_app_args(app_path, args)
    cluster = None
    if not req.local:
        cluster = probe_cluster(req.partition, env)
        check_fit(req, cluster)
    mpi = mpi_plugin(req, cluster) if cluster else None
    host = read_host(os.environ) if req.local else None

    points: list[dict[str, Any]] = []
    for mode in req.modes:
        for values, run_args, args, given in variants:
            adj = slurm_adjust(mode, req.ranks_per_node, cluster, given) if cluster else Adjusted()
            for n in req.nodes:
                base = point_name(req.app, req.scaling, mode, n)
                name = "-".join(p for p in (base, axis_suffix(req.axes, values)) if p)
                shown = adj if host is None else \
                    local_adjust(name, mode, n, req.ranks_per_node, given, host)
                notes = list(shown.notes) + shared_host_notes(
                    n, req.ranks_per_node, cluster, host is not None)
                points.append({
                    "name": name, "app": req.app, "mode": mode, "scaling": req.scaling,
                    "nodes": n, "ranks_per_node": req.ranks_per_node,
                    "ranks": n * req.ranks_per_node, "app_args": args, "run_args": run_args,
                    "axes": axis_text(req.axes, values), "repeats": req.repeats,
                    # What the job script adds, and what the plan's target adds (shown by plan).
                    "slurm": {"run_args": adj.run_args, "sbatch": adj.sbatch,
                              "env": yield_env(n, req.ranks_per_node, cluster)},
                    "added": shown.sbatch + shown.run_args, "notes": notes,
                    "script": f"jobs/{base}.sbatch", "log": f"logs/{name}-%j.out",
                    "job_id": None, "tasks": [None] * req.repeats, "submitted": None,
                    "local": None,
                })
    jobs = group_jobs(points)
    manifest = {
        "schema": SCHEMA, "schema_version": VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": shlex.join(argv),
        "directory": str(study_dir), "target": "local" if req.local else "slurm",
        "request": {"app": req.app, "nodes": list(req.nodes),
                    "ranks_per_node": req.ranks_per_node, "modes": list(req.modes),
                    "scaling": req.scaling, "size": req.size, "time": req.time,
                    "partition": cluster.partition if cluster else req.partition,
                    "app_args": list(req.app_args), "run_args": list(req.run_args),
                    "sbatch_args": list(req.sbatch_args), "repeats": req.repeats,
                    "axes": [{"target": a.target, "option": a.option, "values": list(a.values),
                              "switch": a.switch} for a in req.axes],
                    "combine": req.combine},
        "cluster": None if cluster is None else {
            "partition": cluster.partition, "nodes": cluster.nodelist,
            "cpus_per_node": min(n.cpus for n in cluster.nodes),
            "usable_cpus_per_node": cluster.usable_cpus,
            "spec_cpus": None if cluster.spec_cpus is None else format_cpulist(cluster.spec_cpus),
            "allow_spec_usage": cluster.allow_spec_usage, "shared_hosts": cluster.shared_hosts,
            "mpi": mpi, "mpi_plugins": list(cluster.mpi_plugins),
            "task_plugin": cluster.task_plugin},
        "python": sys.executable,
        "app_path": str(app_path),
        "points": points,
        "jobs": [{"script": script, "tasks": [[p["name"], k] for p in members
                                              for k in range(req.repeats)],
                  "job_id": None} for script, members in jobs.items()],
    }
    for sub in ("jobs", "logs", "runs"):
        (study_dir / sub).mkdir(parents=True, exist_ok=True)
    for job in manifest["jobs"]:
        path = study_dir / job["script"]
        path.write_text(render_script(manifest, jobs[job["script"]], mpi))
        path.chmod(0o755)
    save(study_dir, manifest)
    return manifest


def group_jobs(points: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Points of one shape (mode, node count, sbatch options) share a job script, a job
    array of all their repeats; sets each point's script and log pattern."""
    shapes: dict[tuple[str, tuple[str, ...]], list[dict[str, Any]]] = {}
    for point in points:
        base = point["script"][5:-7]
        shapes.setdefault((base, tuple(point["slurm"]["sbatch"])), []).append(point)
    jobs: dict[str, list[dict[str, Any]]] = {}
    count: dict[str, int] = {}
    for (base, _), members in shapes.items():
        count[base] = count.get(base, 0) + 1
        name = base if count[base] == 1 else f"{base}-{count[base]}"
        array = sum(p["repeats"] for p in members) > 1
        for p in members:
            p["script"] = f"jobs/{name}.sbatch"
            p["log"] = f"logs/{name}-" + ("%A_%a.out" if array else "%j.out")
        jobs[f"jobs/{name}.sbatch"] = members
    return jobs


def shared_host_notes(nodes: int, rpn: int, cluster: Cluster | None, local: bool) -> list[str]:
    """Why a multi-node point on shared hosts is not what a cluster would measure."""
    if nodes < 2:
        return []
    if local:
        return [f"{nodes} virtual nodes share this host's CPUs: their noise and timings are not "
                "independent (recorded as provenance shared_hosts)"]
    if cluster is not None and cluster.shared_hosts:
        hosts = sorted({n.hostname for n in cluster.nodes})
        return [f"Slurm nodes of partition {cluster.partition} share host(s) "
                f"{', '.join(hosts)}: {nodes} nodes are not {nodes} machines, their noise and "
                "timings are not independent (recorded as provenance shared_hosts)"]
    return []


def yield_env(nodes: int, rpn: int, cluster: Cluster | None) -> dict[str, str]:
    """Environment a point's job needs: Open MPI's yield-when-idle when nodes of the job
    share a host. Every node plans its ranks on the same CPU numbers, so ranks of two such
    nodes share CPUs, and busy-polling ranks on one CPU turn a microsecond message into
    milliseconds; Open MPI cannot see that from one node."""
    if cluster is None or not cluster.shared_hosts or nodes < 2:
        return {}
    hosts = [n.hostname for n in cluster.nodes[:nodes]]
    if len(set(hosts)) < len(hosts):
        return {"OMPI_MCA_mpi_yield_when_idle": "1"}
    return {}


def render_script(manifest: Mapping[str, Any], points: Sequence[Mapping[str, Any]],
                  mpi: str | None) -> str:
    """The job script of points of one shape (noise survey or scaling template): one run,
    or a job array with one task per (point, repeat) that picks its point by task id."""
    req = manifest["request"]
    study_dir = manifest["directory"]
    first = points[0]
    kind = "scaling" if first["app"] in SCALING_APPS else "noise-survey"
    sbatch = list(first["slurm"]["sbatch"])
    if req["partition"]:
        sbatch.insert(0, f"--partition={req['partition']}")
    tasks = [(p, k) for p in points for k in range(int(p.get("repeats", 1)))]
    if len(tasks) > 1:
        sbatch.append(f"--array=0-{len(tasks) - 1}")
    lines = [f"#SBATCH {a}" for a in sbatch]
    if req["sbatch_args"]:
        lines.append(f"#SBATCH {shlex.join(req['sbatch_args'])}")
    srun = [f"--mpi={mpi}"] if mpi else []
    cluster = manifest["cluster"]
    if cluster is None or "task/none" not in cluster["task_plugin"]:
        # mckmpi pins the ranks; without a binding task plugin srun would only warn.
        srun.append("--cpu-bind=none")
    base = first["script"][5:-7]
    title = (f"{first['app']} {first['scaling'] + ' scaling, ' if first['scaling'] else ''}"
             f"{first['mode']} mode, {counted(first['nodes'], 'node')} x "
             f"{counted(first['ranks_per_node'], 'rank')}"
             + (f", {counted(len(points), 'point')} x "
                f"{counted(len(tasks) // len(points), 'repeat')} as a job array"
                if len(tasks) > 1 else ""))
    mckmpi = shlex.join([manifest["python"], "-m", "mckmpi"])
    app = shlex.quote(manifest["app_path"])

    def launch(p: Mapping[str, Any], k: int, indent: str) -> list[str]:
        env = {"MCKMPI_STUDY_POINT": p["name"], "MCKMPI_STUDY_REPEAT": str(k),
               "MCKMPI_STUDY_AXES": p.get("axes", ""), **p["slurm"].get("env", {})}
        run_args = shlex.join([*p["run_args"], *p["slurm"]["run_args"]])
        return ([f"{indent}export {key}={shlex.quote(value)}" for key, value in env.items()]
                + [f"{indent}srun {shlex.join(srun)} {mckmpi} run --mode {p['mode']} {run_args} "
                   f"--out runs -- {app} {shlex.join(p['app_args'])}"])

    if len(tasks) == 1:
        body = launch(first, 0, "")
    else:
        body = ['case "${SLURM_ARRAY_TASK_ID}" in']
        for i, (p, k) in enumerate(tasks):
            body += [f"  {i})  # {p['name']} repeat {k}", *launch(p, k, "    "), "    ;;"]
        body += ['  *) echo "mckmpi: no study task ${SLURM_ARRAY_TASK_ID}" >&2; exit 2 ;;', "esac"]
    log = f"{study_dir}/{first['log']}"
    return Template((TEMPLATES / f"{kind}.sbatch.in").read_text()).substitute(
        title=title, study_dir=study_dir, study_dir_q=shlex.quote(study_dir),
        job_name=base, nodes=first["nodes"], ranks_per_node=first["ranks_per_node"],
        ranks=first["ranks"], time=req["time"], log=log,
        sbatch_lines="\n".join(lines), point=base, scaling=first["scaling"],
        app_name=first["app"], mode=first["mode"], launch="\n".join(body))


# --- the manifest -------------------------------------------------------------------------


def load(study_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a study directory, or a clear error."""
    path = Path(study_dir) / MANIFEST
    if not path.is_file():
        raise StudyError(f"{study_dir} is not a study directory (no {MANIFEST}): "
                         "create one with `mckmpi study plan`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise StudyError(f"{path}: not a readable study manifest ({exc})") from None
    if manifest.get("schema") != SCHEMA or int(manifest.get("schema_version", 0)) > VERSION:
        raise StudyError(f"{path}: not a study manifest this mckmpi reads "
                         f"(schema {manifest.get('schema')!r} v{manifest.get('schema_version')})")
    return manifest


def save(study_dir: str | os.PathLike[str], manifest: Mapping[str, Any]) -> Path:
    """Write the manifest atomically, so an interrupted submission never corrupts it."""
    path = Path(study_dir) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(path)
    return path


def request_of(manifest: Mapping[str, Any]) -> Request:
    r = manifest["request"]
    return Request(app=r["app"], nodes=tuple(r["nodes"]), ranks_per_node=r["ranks_per_node"],
                   modes=tuple(r["modes"]), scaling=r["scaling"], size=r["size"],
                   partition=r["partition"], time=r["time"], app_args=tuple(r["app_args"]),
                   run_args=tuple(r["run_args"]), sbatch_args=tuple(r["sbatch_args"]),
                   repeats=int(r.get("repeats", 1)), combine=r.get("combine", "cross"),
                   axes=tuple(Axis(a["target"], a["option"], tuple(a["values"]),
                                   bool(a.get("switch"))) for a in r.get("axes", [])))


# --- submit and status --------------------------------------------------------------------


def submit(study_dir: str | os.PathLike[str], env: Mapping[str, str] | None = None,
           echo: Callable[[str], None] = lambda line: None,
           retry_failed: bool = False) -> list[dict[str, Any]]:
    """Submit every job script that has no job yet (an array for points of one shape); the
    job ids go into the manifest at once. `retry_failed`: first give up the runs that ended
    without completing (their job and end move to the point's `attempts`) and submit
    exactly those again (the failed tasks of an array as an array of just them)."""
    study_dir = Path(study_dir)
    manifest = load(study_dir)
    if manifest["target"] == "local":
        raise StudyError(f"{study_dir} was planned with --local for `mckmpi study run`; plan "
                         "it again without --local to submit it to Slurm")
    req = request_of(manifest)
    check_fit(req, probe_cluster(req.partition, env))
    points = {p["name"]: p for p in manifest["points"]}
    jobs = jobs_of(manifest)
    again: list[tuple[dict[str, Any], list[int]]] = []  # array jobs: tasks to run again
    if retry_failed:
        runs = _run_states(study_dir, manifest, env)
        for job in jobs:
            if not job["job_id"]:
                continue
            failed = [t for t, (name, repeat) in enumerate(job["tasks"])
                      if (state := runs[(name, repeat)]).backend == "slurm" and state.failed]
            for t in failed:
                name, repeat = job["tasks"][t]
                state = runs[(name, repeat)]
                points[name].setdefault("attempts", []).append(
                    {"repeat": repeat, "job_id": state.job_id,
                     "end": points[name].get("ends", {}).get(state.job_id) or _end(state)})
            if failed and len(job["tasks"]) == 1:
                job["job_id"] = None  # the whole script again
            elif failed:
                again.append((job, failed))
        save(study_dir, manifest)
    todo = [j for j in jobs if not j["job_id"]]
    for job, tasks in again:
        try:
            job_id = slurm.submit(study_dir / job["script"], env=env,
                                  extra_args=[f"--array={','.join(map(str, tasks))}"])
        except slurm.SlurmError as exc:
            raise StudyError(f"{exc} (`mckmpi study submit --retry failed {study_dir}` again "
                             "retries what is left)") from None
        for t in tasks:
            name, repeat = job["tasks"][t]
            ids = point_tasks(points[name])
            ids[repeat] = f"{job_id}_{t}"
            points[name]["tasks"] = ids
        save(study_dir, manifest)
        echo(f"{job['script']}: job {job_id} (again: array tasks {', '.join(map(str, tasks))})")
    for done, job in enumerate(todo):
        try:
            job_id = slurm.submit(study_dir / job["script"], env=env)
        except slurm.SlurmError as exc:
            raise StudyError(f"{exc} ({done} of {len(todo)} job scripts submitted and recorded; "
                             f"`mckmpi study submit {study_dir}` again submits the rest)") from None
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        job["job_id"] = job_id
        array = len(job["tasks"]) > 1
        for task, (name, repeat) in enumerate(job["tasks"]):
            point = points[name]
            point["job_id"], point["submitted"] = job_id, stamp
            point.setdefault("tasks", [None] * int(point.get("repeats", 1)))[repeat] = \
                f"{job_id}_{task}" if array else job_id
        save(study_dir, manifest)
        echo(f"{job['script']}: job {job_id}"
             + (f" (array of {len(job['tasks'])}: {', '.join(sorted({n for n, _ in job['tasks']}))})"
                if array else ""))
    return todo + [job for job, _ in again]


def jobs_of(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The manifest's job scripts (a version 1 manifest: one per point)."""
    if "jobs" not in manifest:
        manifest["jobs"] = [{"script": p["script"], "tasks": [[p["name"], 0]],
                             "job_id": p["job_id"]} for p in manifest["points"]]
    return manifest["jobs"]


#: A point no backend has started yet; one whose Slurm job left no record anywhere.
NOT_SUBMITTED, UNKNOWN = "NOT SUBMITTED", "UNKNOWN"


@dataclass(frozen=True)
class PointState:
    """A run of a point (one repeat) as its backend last reported it, in Slurm's vocabulary
    of job states (COMPLETED, FAILED, PENDING, ...) whether Slurm or this host (`study run`)
    ran it."""

    name: str  # the point, with '#k' for repeat k when it has repeats
    backend: str  # "slurm" or "local": where the point runs
    job_id: str | None  # the Slurm job ('A_T' for an array task); None for local runs
    state: str
    exit_code: int | None
    log: str | None
    detail: str  # the reason while pending, the log's first error after a failure
    signal: int | None = None  # the signal that ended the job (Slurm's ExitCode N:SIG)

    @property
    def started(self) -> bool:
        return self.state != NOT_SUBMITTED

    @property
    def final(self) -> bool:
        """Nothing will change without the user: finished, or never started."""
        return self.state in slurm.FINAL_STATES or not self.started

    @property
    def ok(self) -> bool:
        """Completed with status 0 and no signal (Slurm's ``0:15`` is SIGTERM, not success)."""
        return self.state == "COMPLETED" and not self.exit_code and not self.signal

    @property
    def failed(self) -> bool:
        return self.state in slurm.FINAL_STATES and not self.ok

    @property
    def ending(self) -> str:
        """How the job really ended, in a few words: ``completed``, ``exit 3``, ``signal
        SIGTERM``, ``timeout``, ``cancelled``, ``node-fail``, ``out-of-memory``, ...; empty
        while it has not ended."""
        if self.state not in slurm.FINAL_STATES:
            return ""
        if self.ok:
            return "completed"
        if self.state not in ("COMPLETED", "FAILED"):
            word = self.state.lower().replace("_", "-")
        else:
            word = f"exit {self.exit_code}" if self.exit_code else "failed"
        if self.signal:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = str(self.signal)
            word = f"signal {name}" if word in ("failed", "completed") else f"{word}, {name}"
        return word


def run_label(point: Mapping[str, Any], repeat: int) -> str:
    """A run's name in status tables: the point, with '#k' when it has repeats."""
    return point["name"] if int(point.get("repeats", 1)) == 1 else f"{point['name']}#{repeat}"


def point_tasks(point: Mapping[str, Any]) -> list[str | None]:
    """The Slurm job id of each repeat (array tasks 'A_T'); None where not submitted."""
    tasks = point.get("tasks")
    if tasks is None:  # a version 1 manifest: one job per point
        return [point["job_id"]]
    return list(tasks)


def local_runs(point: Mapping[str, Any]) -> list[dict[str, Any] | None]:
    """The record of each repeat's run on this host (None: not run here)."""
    local = point.get("local")
    if isinstance(local, dict):  # a version 1 manifest
        return [local]
    runs = list(local or [])
    return runs + [None] * (int(point.get("repeats", 1)) - len(runs))


def status(study_dir: str | os.PathLike[str],
           env: Mapping[str, str] | None = None) -> list[PointState]:
    """The state, exit code and log of every run (point x repeat) of a study, from one
    query of the controller for all of them (accounting only for jobs it forgot). The end
    of every finished Slurm job is kept in the manifest (the point's `ends`, by job id), so
    it stays known after the controller forgot the job."""
    study_dir = Path(study_dir)
    manifest = load(study_dir)
    runs = _run_states(study_dir, manifest, env)
    changed = False
    by_name = {p["name"]: p for p in manifest["points"]}
    for (name, _), state in runs.items():
        if state.backend == "slurm" and state.state in slurm.FINAL_STATES and state.job_id:
            ends = by_name[name].setdefault("ends", {})
            end = _end(state)
            if ends.get(state.job_id) != end:
                ends[state.job_id], changed = end, True
    if changed:
        save(study_dir, manifest)
    return list(runs.values())


def _run_states(study_dir: Path, manifest: Mapping[str, Any],
                env: Mapping[str, str] | None) -> dict[tuple[str, int], PointState]:
    """Every run's state by (point, repeat), from one query of the controller."""
    points = manifest["points"]
    ids = [j for p in points for j in point_tasks(p) if j]
    known = slurm.job_states(ids, env) if ids else {}
    return {(p["name"], k): point_state(study_dir, p, manifest["target"], env, k, known)
            for p in points for k in range(len(point_tasks(p)))}


def _end(state: PointState) -> dict[str, Any]:
    """What study.json keeps of a finished job."""
    return {"job_id": state.job_id, "state": state.state, "exit_code": state.exit_code,
            "signal": state.signal, "ending": state.ending}


def point_state(study_dir: Path, point: Mapping[str, Any], target: str,
                env: Mapping[str, str] | None = None, repeat: int = 0,
                known: Mapping[str, slurm.JobState] | None = None) -> PointState:
    """The state of one run of a point: from Slurm when it has a job, else from its run on
    this host (`study run`, also of a plan made for Slurm), else not started on `target`."""
    name = run_label(point, repeat)
    job = point_tasks(point)[repeat]
    if job:
        job = str(job)
        array, _, task = job.partition("_")
        pattern = point["log"].replace("%j", job).replace("%A", array).replace("%a", task)
        st = (known or {}).get(job)
        if st is None:
            try:
                st = slurm.job_state(job, env)
            except slurm.JobNotFound:
                end = point.get("ends", {}).get(job)
                if end:  # kept by an earlier `status`
                    kept = PointState(name, "slurm", job, end["state"], end["exit_code"],
                                      str(study_dir / pattern), "", end["signal"])
                    return replace(kept, detail=first_error(kept.log) if kept.failed else "")
                return PointState(name, "slurm", job, UNKNOWN, None, None,
                                  "no record in scontrol, sacct or the job completion log")
        log = st["stdout"] or str(study_dir / pattern)
        state = PointState(name, "slurm", job, st["state"], st["exit_code"], log, "",
                           st["signal"])
        return replace(state, detail=first_error(log) if state.failed else (st["reason"] or ""))
    local = local_runs(point)[repeat]
    if not local:
        return PointState(name, target, None, NOT_SUBMITTED, None, None, "")
    log = str(study_dir / local["log"])
    failed = local["exit_code"] != 0
    return PointState(name, "local", None, "FAILED" if failed else "COMPLETED",
                      local["exit_code"], log, first_error(log) if failed else "")


def progress(states: Sequence[PointState]) -> str:
    """'3 COMPLETED, 1 RUNNING, 2 PENDING': how many runs are in each state."""
    counts: dict[str, int] = {}
    for st in states:
        counts[st.state] = counts.get(st.state, 0) + 1
    return ", ".join(f"{n} {state}" for state, n in sorted(counts.items(), key=lambda x: -x[1]))


def wait(study_dir: str | os.PathLike[str], timeout: float, poll: float = 2.0,
         env: Mapping[str, str] | None = None,
         echo: Callable[[str], None] = lambda line: None) -> list[PointState]:
    """Poll `status` until every submitted job has finished or `timeout` seconds passed;
    `echo` gets a progress line whenever the counts of states change."""
    deadline, started, last = time.monotonic() + timeout, time.monotonic(), ""
    while True:
        states = status(study_dir, env)
        line = progress(states)
        if line != last:
            echo(f"[{time.monotonic() - started:5.0f} s] {line}")
            last = line
        if all(s.final for s in states) or time.monotonic() >= deadline:
            return states
        time.sleep(min(poll, max(deadline - time.monotonic(), 0.0)))


def first_error(path: str) -> str:
    """What a failed job's log says went wrong: its first 'error:' line (the cause; srun and
    MPI report the consequences after it), else its last line; at most 200 characters."""
    try:
        with open(path, "rb") as fh:
            lines = [ln.strip() for ln in fh.read(1 << 20).decode(errors="replace").splitlines()]
    except OSError:
        return "log not readable"
    lines = [ln for ln in lines if ln]
    errors = [ln for ln in lines if "error:" in ln.lower()]
    return (errors or lines or ["log is empty"])[0 if errors else -1][:200]


# --- local runs ---------------------------------------------------------------------------


def local_adjust(name: str, mode: str, nodes: int, rpn: int, given: Mapping[str, Any],
                 host: NodeFacts) -> Adjusted:
    """What a point needs to run on this host, its nodes as virtual nodes; error if it cannot."""
    adj = Adjusted()
    if nodes > 1:
        adj.run_args += ["--vnodes", str(nodes)]
    kwargs = {"mode": mode, "linux_cores": given.get("linux_cores", "1"),
              "lwk_cores": given.get("lwk_cores"), "mem": given.get("mem", 256 * 1024**2)}
    over = bool(given.get("oversubscribe"))
    try:
        for v in range(nodes):
            facts = node_facts(host, nodes, v)
            try:
                plan_node(facts, rpn, oversubscribe=over, **kwargs)
            except PartitionError:
                if over:
                    raise
                plan_node(facts, rpn, oversubscribe=True, **kwargs)
                over = True
                adj.oversubscribe = True
                adj.run_args.append("--oversubscribe")
                adj.notes.append(f"--oversubscribe added: {rpn} ranks per node and "
                                 f"{len(facts.cpus)} CPUs per virtual node on this host")
    except PartitionError as exc:
        raise StudyError(f"point {name} does not fit this host: {exc}") from None
    return adj


def run_local(study_dir: str | os.PathLike[str], echo: Callable[[str], None] = print,
              timeout: float = 3600.0) -> list[PointState]:
    """Run every point (each repeat) on this host as a `Job` through mpiexec, one after the
    other, and record results."""
    study_dir = Path(study_dir).absolute()
    manifest = load(study_dir)
    host = read_host(os.environ)
    points = manifest["points"]
    given = [parse_run_args(p["run_args"]) for p in points]
    adjusted = [local_adjust(p["name"], p["mode"], p["nodes"], p["ranks_per_node"], g, host)
                for p, g in zip(points, given, strict=True)]  # all checked before the first
    for sub in ("logs", "runs"):
        (study_dir / sub).mkdir(exist_ok=True)
    runs = [(p, g, adj, k) for p, g, adj in zip(points, given, adjusted, strict=True)
            for k in range(int(p.get("repeats", 1)))]
    states = []
    for i, (point, opts, adj, k) in enumerate(runs, 1):
        tag = f"[{i}/{len(runs)}] {run_label(point, k)}"
        stem = point["name"] if int(point.get("repeats", 1)) == 1 else f"{point['name']}-r{k}"
        run_file = _free_name(study_dir, f"runs/{stem}-local", ".h5")
        log = f"logs/{stem}-local.out"
        oversubscribe = bool(opts.get("oversubscribe")) or adj.oversubscribe
        env = {"MCKMPI_STUDY_POINT": point["name"], "MCKMPI_STUDY_REPEAT": str(k),
               "MCKMPI_STUDY_AXES": point.get("axes", "")}
        if oversubscribe or point["ranks"] > len(host.cpus):
            # Ranks that share a CPU must not busy-poll while they wait for each other.
            env["OMPI_MCA_mpi_yield_when_idle"] = "1"
        options = {k2: v for k2, v in opts.items() if k2 != "oversubscribe"}
        job = Job((manifest["app_path"], *point["app_args"]), point["ranks"],
                  {**options, "mode": point["mode"], "out": str(study_dir / run_file)},
                  vnodes=point["nodes"], oversubscribe=oversubscribe, env=env)
        notes = list(dict.fromkeys(adj.notes + list(point.get("notes", []))))
        echo(f"{tag}: {point['ranks']} ranks on {point['nodes']} "
             f"{'virtual node' if point['nodes'] == 1 else 'virtual nodes'}, {point['mode']} mode"
             + "".join(f"; {n}" for n in notes))
        started = time.monotonic()
        code = _run_logged(job.render("mpiexec"), study_dir / log, study_dir, timeout)
        seconds = time.monotonic() - started
        local = local_runs(point)
        local[k] = {"exit_code": code, "seconds": round(seconds, 3), "log": log,
                    "run_file": run_file if code == 0 else None,
                    "run_args": adj.run_args, "notes": adj.notes,
                    "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        point["local"] = local
        save(study_dir, manifest)
        state = point_state(study_dir, point, "local", None, k)
        states.append(state)
        if code == 0:
            echo(f"{tag}: completed in {seconds:.1f} s, run file {run_file}")
        else:
            echo(f"{tag}: FAILED with exit code {code} after {seconds:.1f} s, log {log}: "
                 f"{state.detail}")
    return states


def _free_name(study_dir: Path, stem: str, suffix: str) -> str:
    """`stem + suffix`, or with -2, -3, ... when a run file of an earlier run has it (or its
    partial file does): run files are never overwritten."""
    name, n = stem + suffix, 1
    while (study_dir / name).exists() or (study_dir / f"{name}.partial").exists():
        n += 1
        name = f"{stem}-{n}{suffix}"
    return name


def _run_logged(launch: Launch, log: Path, cwd: Path, timeout: float) -> int:
    """Run a job with its output in `log`; after `timeout` seconds stop it and all its ranks."""
    with open(log, "wb") as out:
        out.write(f"$ {shlex.join(launch.argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(launch.argv, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, cwd=cwd, env=launch.env,
                                start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            out.write(f"\nmckmpi: stopped after {timeout:g} s\n".encode())
            return 124
