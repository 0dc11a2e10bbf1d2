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
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mckmpi.trace.schema import RANKS_DTYPE
from mckmpi.trace.tracer import Record, Tracer

#: What a run file of an MPI executable does not hold (the `app` group's `not_measured`).
NOT_MEASURED = ("noise, memory, scheduler and offload records (an MPI executable runs as the "
                "rank's child, without the LWK runtime or the offload); clock offsets between "
                "ranks (no harness communication: app/start_unix_ns is each node's real-time "
                "clock)")
#: How long rank 0 waits for the other ranks' fragments after its own program ended.
FRAGMENT_WAIT_S = 120.0


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


def save_fragment(directory: Path, rank: int, tracer: Tracer) -> Path:
    """One rank's records as numpy arrays (no pickle) plus a JSON index, renamed into
    place when complete so rank 0 never reads half a fragment."""
    directory.mkdir(parents=True, exist_ok=True)
    keys = sorted(tracer.records)
    index = {"keys": [[k, tracer.records[k].kind, tracer.records[k].units] for k in keys],
             "attrs": tracer.group_attrs}
    arrays = {f"r{i}": tracer.records[k].data for i, k in enumerate(keys)}
    tmp = directory / f".rank-{rank}.{os.getpid()}.npz"
    with open(tmp, "wb") as fh:
        np.savez(fh, index=np.array(json.dumps(index)), **arrays)
    final = directory / f"rank-{rank}.npz"
    tmp.replace(final)
    return final


def load_fragment(path: Path) -> Tracer:
    with np.load(path, allow_pickle=False) as npz:
        index = json.loads(str(npz["index"]))
        tracer = Tracer(group_attrs=index["attrs"])
        for i, (key, kind, units) in enumerate(index["keys"]):
            tracer.records[key] = Record(kind, npz[f"r{i}"], dict(units))
    return tracer


def run_binary(target: str, args: tuple[str, ...]) -> tuple[int, int, int, int]:
    """Run the program; returns (exit status as a shell reports it, wall ns, real-time
    start and end ns)."""
    # A path as the user gave it ('./a.out' is stored as 'a.out'): never a PATH search.
    exe = str(Path(target).resolve())
    start_unix, started = time.time_ns(), time.monotonic_ns()
    status = subprocess.run([exe, *args], check=False).returncode
    wall, end_unix = time.monotonic_ns() - started, time.time_ns()
    return (status if status >= 0 else 128 - status), wall, start_unix, end_unix


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


def collect(path: Path, size: int, timeout: float = FRAGMENT_WAIT_S) -> tuple[list[Tracer], list[int]]:
    """Rank 0: every rank's fragment, waiting up to `timeout` seconds, in rank order; a rank
    that never reported gets its /ranks row only (node -1, `app/reported` 0)."""
    directory = fragment_dir(path)
    deadline = time.monotonic() + timeout
    while True:
        present = {r for r in range(size) if (directory / f"rank-{r}.npz").is_file()}
        if len(present) == size or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    tracers = []
    for r in range(size):
        if r in present:
            tracers.append(load_fragment(directory / f"rank-{r}.npz"))
            continue
        absent = Tracer()
        row = np.zeros((), dtype=RANKS_DTYPE)
        row["rank"], row["node"], row["vnode"], row["clock_rtt_ns"] = r, -1, -1, -1
        absent.scalar("", "ranks", row)
        absent.scalar("app", "reported", 0)
        tracers.append(absent)
    return tracers, sorted(set(range(size)) - present)


def finish(path: Path, tracers: list[Tracer], root: dict[str, Any],
           provenance: dict[str, Any], missing: list[int]) -> Path:
    """Rank 0: the run file from the fragments, then the fragments are removed."""
    from mckmpi.trace.writer import write_assembled

    reported = [t for i, t in enumerate(tracers) if i not in missing]
    root = dict(root, nnodes=number_nodes(reported), missing_ranks=",".join(map(str, missing)))
    endings = [None if r in missing else _ending(r, int(t.records["app/exit_code"].data))
               for r, t in enumerate(tracers)]
    written = write_assembled(path, tracers, root, provenance, endings)
    shutil.rmtree(fragment_dir(path), ignore_errors=True)
    return written


def _ending(rank: int, status: int) -> dict[str, Any]:
    """A rank's ending from its program's exit status as a shell reports it."""
    from mckmpi import endings

    if status == 0:
        return endings.ending("normal", rank, 0)
    return endings.ending("exit", rank, 0, status,
                          error=f"rank {rank}: the program exited with status {status}")


def run_external(settings: Any, app: Any, argv: list[str], placement: Any, plan: Any) -> int:
    """This rank's life when the app is an MPI executable (the rank is already pinned)."""
    from mckmpi import provenance as prov
    from mckmpi.info import versions
    from mckmpi.utility.units import format_cpulist

    path = run_file_path(settings, app, placement)
    status, wall, start_unix, end_unix = run_binary(app.target, app.args)
    if status:  # passed on as this rank's status: said, so that 2 is not read as ours
        print(f"mckmpi: rank {placement.rank}: {app.target} exited with status {status}",
              file=sys.stderr, flush=True)
    if path is None:
        announce(None, [], placement.rank)
        return status
    tracer = Tracer()
    rp = plan.rank(placement.local_rank)
    tracer.scalar("", "ranks", ranks_row(placement, format_cpulist(rp.cpus),
                                         format_cpulist(plan.linux_cpus), rp.numa_node))
    tracer.scalar("app", "wall_ns", wall, units="ns")
    tracer.scalar("app", "exit_code", status)
    tracer.scalar("app", "reported", 1)
    tracer.scalar("app", "start_unix_ns", start_unix, units="ns")
    tracer.scalar("app", "end_unix_ns", end_unix, units="ns")
    tracer.attrs("app", name=app.name, not_measured=NOT_MEASURED, executable="mpi")
    node = placement.host if placement.vnodes == 1 else f"{placement.host}-v{placement.vnode}"
    if placement.local_rank == 0:
        tracer.attrs("node_facts", **{k: v for k, v in vars(prov.node_facts(node)).items()})
    save_fragment(fragment_dir(path), placement.rank, tracer)
    if placement.rank != 0:
        return status
    tracers, missing = collect(path, placement.size)
    nodes = [prov.NodeProvenance(**t.group_attrs.pop("node_facts")) for t in tracers
             if "node_facts" in t.group_attrs]
    provenance: dict[str, Any] = dict(versions(mpi=False))
    provenance["mpi_library"] = "the executable's own (mckmpi does not initialise MPI)"
    provenance["node_plans"] = [plan.describe()]
    provenance["settings"] = [f"{k}={v} ({settings.origins[k]})"
                              for k, v in sorted(settings.values.items())]
    provenance.update(prov.attributes(prov.job_facts(os.environ, app.kind, app.target, argv),
                                      nodes))
    provenance["hosts"] = sorted({n.name for n in nodes})
    if prov.shared_hosts_note(nodes):
        print(f"mckmpi: note: {prov.shared_hosts_note(nodes)}", file=sys.stderr, flush=True)
    root = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(argv),
            "app": app.target, "app_args": " ".join(app.args), "mode": settings.mode,
            "world_size": placement.size, "vnodes": settings.vnodes,
            "launcher": placement.launcher,
            "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
            "slurm_nodelist": os.environ.get("SLURM_JOB_NODELIST", "")}
    written = finish(path, tracers, root, provenance, missing)
    announce(written, missing, placement.rank)
    return status


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
