"""An MPI executable under `mckmpi run`: the rank's child, recorded without MPI in the harness.

An MPI program is its rank's MPI process, so the harness must not initialise MPI itself
(two MPI processes claiming one rank). Each `mckmpi run` instead pins itself, starts the
program as its child (which inherits the pinning and the launcher's environment, so the
program is the rank), waits for it, and records what it can see from outside: placement,
wall time, exit status, the partition and the provenance. There is no communicator to
write the run file collectively, so every rank leaves its records (the same Tracer calls
as an in-process app) as a fragment in a directory beside the run file, on the file system
the run file goes to, and rank 0 lays them out with the one run-file writer once all have
arrived. Not measured, and said so in the file: noise, memory, scheduler, offload (the
LWK runtime and the offload need the rank's own process) and clock offsets between ranks.

How the program ended is the rank's ending (`mckmpi.endings`), taken when it ends. Its own
MPI_Abort would look like any non-zero exit from outside: a small library preloaded into
the program only (`mckmpi/_abortrecord.c`) records the errorcode first, so the ending is
`aborted`. The launcher then tears the job down (Open MPI's mpiexec: SIGTERM to every rank's
process group, SIGKILL a second later), so the harness notes terminating signals instead of
dying of them, waits for its program (which got the signal too), and rank 0, which gathered
everything else before the program started, only has to collect and write.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mckmpi import endings
from mckmpi.errors import error_line
from mckmpi.trace.schema import RANKS_DTYPE
from mckmpi.trace.tracer import Record, Tracer

#: What a run file of an MPI executable does not hold (the `app` group's `not_measured`).
NOT_MEASURED = ("noise, memory, scheduler and offload records (an MPI executable runs as the "
                "rank's child, without the LWK runtime or the offload); clock offsets between "
                "ranks (no harness communication: app/start_unix_ns is each node's real-time "
                "clock)")
#: How long rank 0 waits for the other ranks' fragments after its own program ended.
FRAGMENT_WAIT_S = 120.0
#: At most this long after a terminating signal: the job is being torn down, every rank's
#: program ends at once, and mpiexec sends SIGKILL a second after SIGTERM.
FRAGMENT_WAIT_SIGNALLED_S = 0.4
#: The variable that names the directory the MPI_Abort recorder writes to.
ABORT_RECORD_VARIABLE = "MCKMPI_ABORT_RECORD"


def job_key(env: Mapping[str, str]) -> str | None:
    """A name every rank of the job derives alike without talking: the Slurm job and step,
    or the PMIx namespace (Open MPI's mpiexec); None under launchers that offer neither."""
    job = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    step = env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID")
    if job and step is not None and "OMPI_COMM_WORLD_SIZE" not in env:
        return f"job{job}.{step}"
    namespace = env.get("PMIX_NAMESPACE") or env.get("OMPI_MCA_ess_base_jobid")
    if namespace:
        return "mpi-" + "".join(c if c.isalnum() or c in "-_." else "_" for c in namespace)
    return None


def fragment_dir(path: Path) -> Path:
    return path.with_name(f".{path.name}.ranks")


def save_fragment(directory: Path, rank: int, tracer: Tracer, ending: dict[str, Any]) -> Path:
    """One rank's records as numpy arrays (no pickle) plus a JSON index with its ending,
    renamed into place when complete so rank 0 never reads half a fragment."""
    directory.mkdir(parents=True, exist_ok=True)
    keys = sorted(tracer.records)
    index = {"keys": [[k, tracer.records[k].kind, tracer.records[k].units] for k in keys],
             "attrs": tracer.group_attrs, "ending": ending}
    arrays = {f"r{i}": tracer.records[k].data for i, k in enumerate(keys)}
    tmp = directory / f".rank-{rank}.{os.getpid()}.npz"
    with open(tmp, "wb") as fh:
        np.savez(fh, index=np.array(json.dumps(index)), **arrays)
    final = directory / f"rank-{rank}.npz"
    tmp.replace(final)
    return final


def load_fragment(path: Path) -> tuple[Tracer, dict[str, Any]]:
    """A rank's records and ending (`save_fragment`)."""
    with np.load(path, allow_pickle=False) as npz:
        index = json.loads(str(npz["index"]))
        tracer = Tracer(group_attrs=index["attrs"])
        for i, (key, kind, units) in enumerate(index["keys"]):
            tracer.records[key] = Record(kind, npz[f"r{i}"], dict(units))
    return tracer, index["ending"]


@dataclass
class ChildEnd:
    """How the program ended, seen by its parent."""

    returncode: int  # subprocess's: negative when killed by that signal
    abort_code: int | None  # the errorcode of its MPI_Abort, when it called it
    wall_ns: int
    start_unix_ns: int
    end_unix_ns: int

    @property
    def status(self) -> int:
        """The exit status as a shell reports it (128 + N for signal N)."""
        return self.returncode if self.returncode >= 0 else 128 - self.returncode


def abort_recorder() -> Path | None:
    """The MPI_Abort recorder library, or None: not built, or installed under a path that
    LD_PRELOAD cannot hold (it splits on spaces and colons)."""
    spec = importlib.util.find_spec("mckmpi._abortrecord")
    if spec is None or not spec.origin or any(c in spec.origin for c in " :"):
        return None
    return Path(spec.origin)


def child_env(records: Path, env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The program's environment: the recorder preloaded ahead of the user's LD_PRELOAD,
    writing into `records` (the harness itself keeps its own environment)."""
    out = dict(env)
    recorder = abort_recorder()
    if recorder is not None:
        user = env.get("LD_PRELOAD", "")
        out["LD_PRELOAD"] = f"{recorder}:{user}" if user else str(recorder)
        out[ABORT_RECORD_VARIABLE] = str(records)
    return out


def read_abort_record(records: Path, pid: int) -> int | None:
    """The errorcode process `pid` passed to MPI_Abort (the recorder's file `records/PID`:
    the errorcode in decimal, renamed into place whole), or None if it did not call it."""
    try:
        return int((records / str(pid)).read_text())
    except FileNotFoundError:
        return None


def run_binary(target: str, args: tuple[str, ...], beside: Path | None) -> ChildEnd:
    """Run the program with the MPI_Abort recorder preloaded; how it ended. The recorder
    writes into a directory in `beside` (the run's fragment directory, so a job killed
    outright leaves nothing anywhere else), or in the temporary directory without a run
    file."""
    # A path as the user gave it ('./a.out' is stored as 'a.out'): never a PATH search.
    exe = str(Path(target).resolve())
    if beside is not None:
        beside.mkdir(parents=True, exist_ok=True)
    records = Path(tempfile.mkdtemp(prefix="abort-", dir=beside))
    try:
        start_unix, started = time.time_ns(), time.monotonic_ns()
        child = subprocess.Popen([exe, *args], env=child_env(records))
        returncode = child.wait()
        wall, end_unix = time.monotonic_ns() - started, time.time_ns()
        abort_code = read_abort_record(records, child.pid)
    finally:
        shutil.rmtree(records, ignore_errors=True)
    return ChildEnd(returncode, abort_code, wall, start_unix, end_unix)


@contextlib.contextmanager
def signals_noted(extra: tuple[int, ...]) -> Iterator[list[int]]:
    """Note the terminating signals (SIGTERM, SIGINT, SIGHUP and the --signal ones) in the
    yielded list instead of dying of them: the program gets them too (its launcher signals
    the rank's process group, or every process of the Slurm step) and ends, and this rank
    then records its ending and, on rank 0, writes the run file."""
    caught: list[int] = []
    sigs = [*endings.ENDING_SIGNALS, *(s for s in extra if s not in endings.ENDING_SIGNALS)]
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in sigs}
    try:
        yield caught
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def child_ending(child: ChildEnd, target: str, rank: int, caught: list[int]) -> dict[str, Any]:
    """The rank's ending: the program's MPI_Abort, else what ended it (a signal, an exit
    status), else a terminating signal the harness noted meanwhile, else normal. Stamped on
    this node's real-time clock (rank 0 maps the stamps onto its own, `finish`)."""
    offset = time.time_ns() - time.monotonic_ns()
    if child.abort_code is not None:
        return endings.of_abort(child.abort_code, rank, offset)
    if child.returncode == 0 and caught:
        return endings.of_signal(caught[0], rank, offset)
    return endings.of_child(child.returncode, target, rank, offset)


def ranks_row(placement: Any, cpus: str, linux_cpus: str, numa_node: int) -> np.ndarray:
    row = np.zeros((), dtype=RANKS_DTYPE)
    row["rank"], row["local_rank"], row["vnode"] = (placement.rank, placement.local_rank,
                                                    placement.vnode)
    row["node"] = -1 if placement.node is None else placement.node
    row["host"], row["pid"] = placement.host.encode()[:64], os.getpid()
    row["cpus"], row["linux_cpus"] = cpus.encode()[:64], linux_cpus.encode()[:64]
    row["numa_node"], row["clock_rtt_ns"] = numa_node, -1
    return row


def number_nodes(tracers: list[Tracer]) -> int:
    """Fill node ids the launcher did not give (Open MPI): hosts in order of first rank.
    Returns the node count."""
    rows = [t.records["ranks"].data for t in tracers]
    if all(int(r["node"]) >= 0 for r in rows):
        return len({int(r["node"]) for r in rows})
    hosts: dict[bytes, int] = {}
    for r in rows:
        key = bytes(r["host"]) + b"/" + str(int(r["vnode"])).encode()
        r["node"] = hosts.setdefault(key, len(hosts))
    return len(hosts)


def collect(path: Path, size: int, caught: Sequence[int] = (), timeout: float = FRAGMENT_WAIT_S
            ) -> tuple[list[Tracer], list[dict[str, Any] | None], list[int]]:
    """Rank 0: every rank's fragment and ending, waiting up to `timeout` seconds, in rank
    order, and at most `FRAGMENT_WAIT_SIGNALLED_S` once `caught` holds a signal (it may
    arrive meanwhile); a rank that never reported gets its /ranks row only (node -1,
    `app/reported` 0) and no ending."""
    directory = fragment_dir(path)
    deadline, hurried = time.monotonic() + timeout, False
    while True:
        present = {r for r in range(size) if (directory / f"rank-{r}.npz").is_file()}
        if caught and not hurried:
            deadline, hurried = min(deadline, time.monotonic() + FRAGMENT_WAIT_SIGNALLED_S), True
        if len(present) == size or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    tracers: list[Tracer] = []
    ends: list[dict[str, Any] | None] = []
    for r in range(size):
        if r in present:
            tracer, end = load_fragment(directory / f"rank-{r}.npz")
            tracers.append(tracer)
            ends.append(end)
            continue
        absent = Tracer()
        row = np.zeros((), dtype=RANKS_DTYPE)
        row["rank"], row["node"], row["vnode"], row["clock_rtt_ns"] = r, -1, -1, -1
        absent.scalar("", "ranks", row)
        absent.scalar("app", "reported", 0)
        tracers.append(absent)
        ends.append(None)
    return tracers, ends, sorted(set(range(size)) - present)


def finish(path: Path, tracers: list[Tracer], ends: list[dict[str, Any] | None],
           root: dict[str, Any], provenance: dict[str, Any], missing: list[int]) -> Path:
    """Rank 0: the run file from the fragments, then the fragments are removed. The ranks'
    ending stamps (each node's real-time clock) are mapped onto rank 0's monotonic clock,
    as the run file's ending times are."""
    from mckmpi.trace.writer import write_assembled

    reported = [t for i, t in enumerate(tracers) if i not in missing]
    root = dict(root, nnodes=number_nodes(reported), missing_ranks=",".join(map(str, missing)))
    to_monotonic = time.monotonic_ns() - time.time_ns()
    ends = [None if e is None else dict(e, time_ns=e["time_ns"] + to_monotonic) for e in ends]
    written = write_assembled(path, tracers, root, provenance, ends)
    shutil.rmtree(fragment_dir(path), ignore_errors=True)
    return written


def wait_taken(fragment: Path, timeout: float = FRAGMENT_WAIT_SIGNALLED_S * 2) -> None:
    """After a signal, a rank other than 0 stays until rank 0 has written the run file (and
    removed the fragments), at most `timeout` seconds: mpiexec ends a job it was told to
    end as soon as its ranks are gone, with SIGKILL to those left, rank 0 in mid-write."""
    deadline = time.monotonic() + timeout
    while fragment.exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def say(end: dict[str, Any]) -> None:
    """The rank's line when its program did not end normally: its exit status is passed on
    as this rank's, so that a 2 is not read as mckmpi's own."""
    if end["ending"] == "aborted":
        print(error_line(end["error"]), file=sys.stderr, flush=True)
    elif end["ending"] != "normal":
        print(f"mckmpi: {end['error']}", file=sys.stderr, flush=True)


def run_external(settings: Any, app: Any, argv: list[str], placement: Any, plan: Any) -> int:
    """This rank's life when the app is an MPI executable (the rank is already pinned).
    What the run file needs besides the program's end is gathered before it starts, so a
    job its launcher tears down leaves rank 0 only the collecting and writing to do."""
    from mckmpi import provenance as prov
    from mckmpi.utility.units import format_cpulist

    path = run_file_path(settings, app, placement)
    tracer = Tracer()
    rp = plan.rank(placement.local_rank)
    tracer.scalar("", "ranks", ranks_row(placement, format_cpulist(rp.cpus),
                                         format_cpulist(plan.linux_cpus), rp.numa_node))
    tracer.attrs("app", name=app.name, not_measured=NOT_MEASURED, executable="mpi")
    node = placement.host if placement.vnodes == 1 else f"{placement.host}-v{placement.vnode}"
    if path is not None and placement.local_rank == 0:
        tracer.attrs("node_facts", **{k: v for k, v in vars(prov.node_facts(node)).items()})
    job = job_records(settings, app, argv, plan) if path and placement.rank == 0 else None
    with signals_noted(endings.parse_signals(settings.signal)) as caught:
        child = run_binary(app.target, app.args, None if path is None else fragment_dir(path))
        end = child_ending(child, app.target, placement.rank, caught)
        say(end)
        if path is None:
            announce(None, [], placement.rank)
            return child.status
        tracer.scalar("app", "wall_ns", child.wall_ns, units="ns")
        tracer.scalar("app", "exit_code", child.status)
        tracer.scalar("app", "reported", 1)
        tracer.scalar("app", "start_unix_ns", child.start_unix_ns, units="ns")
        tracer.scalar("app", "end_unix_ns", child.end_unix_ns, units="ns")
        fragment = save_fragment(fragment_dir(path), placement.rank, tracer, end)
        if job is None:
            if caught:
                wait_taken(fragment)
            return child.status
        tracers, ends, missing = collect(path, placement.size, caught)
        nodes = [prov.NodeProvenance(**t.group_attrs.pop("node_facts")) for t in tracers
                 if "node_facts" in t.group_attrs]
        provenance = {**job.provenance, **prov.attributes(job.facts, nodes),
                      "hosts": sorted({n.name for n in nodes})}
        if prov.shared_hosts_note(nodes):
            print(f"mckmpi: note: {prov.shared_hosts_note(nodes)}", file=sys.stderr, flush=True)
        root = dict(job.root, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    world_size=placement.size, launcher=placement.launcher)
        written = finish(path, tracers, ends, root, provenance, missing)
        announce(written, missing, placement.rank)
    return child.status


@dataclass
class JobRecords:
    """Rank 0's records of the whole job that do not depend on how it ends."""

    facts: dict[str, Any]  # `provenance.job_facts`
    provenance: dict[str, Any]  # versions, settings, the node plan
    root: dict[str, Any]  # root attributes


def job_records(settings: Any, app: Any, argv: list[str], plan: Any) -> JobRecords:
    """What rank 0 records of the whole job but the nodes' facts and the ending."""
    from mckmpi import provenance as prov
    from mckmpi.info import versions

    provenance: dict[str, Any] = dict(versions(mpi=False))
    provenance["mpi_library"] = "the executable's own (mckmpi does not initialise MPI)"
    provenance["node_plans"] = [plan.describe()]
    provenance["settings"] = [f"{k}={v} ({settings.origins[k]})"
                              for k, v in sorted(settings.values.items())]
    root = {"command": " ".join(argv), "app": app.target, "app_args": " ".join(app.args),
            "mode": settings.mode, "vnodes": settings.vnodes,
            "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
            "slurm_nodelist": os.environ.get("SLURM_JOB_NODELIST", "")}
    return JobRecords(prov.job_facts(os.environ, app.kind, app.target, argv), provenance, root)


def run_file_path(settings: Any, app: Any, placement: Any) -> Path | None:
    """The run file every rank names alike: --out FILE.h5, else one named by the job key."""
    out = Path(settings.out)
    if out.suffix == ".h5":
        out.parent.mkdir(parents=True, exist_ok=True)
        return out
    key = job_key(os.environ)
    if key is None and placement.size == 1:
        key = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
    if key is None:
        return None
    out.mkdir(parents=True, exist_ok=True)
    return out / f"{app.name}-{settings.mode}-{key}.h5"


def announce(path: Path | None, missing: list[int], rank: int) -> None:
    if rank != 0:
        return
    if path is None:
        print("mckmpi: no run file for an MPI executable under this launcher: give --out "
              "FILE.h5 (ranks need a common name)", file=sys.stderr, flush=True)
        return
    more = f" (ranks {', '.join(map(str, missing))} did not report)" if missing else ""
    print(f"mckmpi: run file {path}{more}: placement, wall time and exit only; not measured: "
          f"{NOT_MEASURED}", file=sys.stderr, flush=True)
