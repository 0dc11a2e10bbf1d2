"""`mckmpi run`: the per-rank launcher (McKernel's mcexec).

One `mckmpi run` per rank, started by mpiexec or srun. The stages, in order:

1. placement from the launcher's environment (before MPI, so errors are symmetric);
2. the node's partition plan (pure computation; every rank of a node gets the same plan);
3. MPI init, then placement checked against MPI and the plan against the node's ranks;
4. the node's offload proxy, started by the node's local rank 0 while the rank is still an
   ordinary Linux process (when I/O is offloaded: lwk mode by default);
5. pinning: the rank's main thread to its cores; in lwk mode MPI's helper threads go to
   the Linux cores, where McKernel would run them; then the LWK runtime (arena, quiet
   interpreter, scheduler) and the rank's registration with the proxy (seccomp filter);
6. the app: a Python file or module run in-process with its own ``sys.argv``, or an
   executable run as the rank's child (it inherits pinning and filter); an unhandled
   exception or a failed child on any rank aborts COMM_WORLD, like ``python -m mpi4py``.
   An MPI executable is the rank itself: it runs as the child of a pinned rank that never
   initialises MPI, recorded from outside (placement, time, exit; `mckmpi.external`);
7. the run file, written collectively by all ranks.
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from mckmpi.app import App
from mckmpi.config import Settings
from mckmpi.context import Context, set_context
from mckmpi.errors import PartitionError, UsageError
from mckmpi.offload.policy import Policy
from mckmpi.node.partition import NodePlan, node_facts, plan_node
from mckmpi.node.host import NodeFacts, read_host
from mckmpi.node.placement import Placement, from_env, verify, with_vnodes
from mckmpi.trace.schema import RANKS_DTYPE
from mckmpi.trace.tracer import Tracer
from mckmpi.utility.units import format_cpulist


#: How long a rank other than 0 that exits with an error waits before aborting the job.
ABORT_GRACE_S = 0.5


def announces_errors() -> bool:
    """Whether this rank reports errors that every rank finds (node-local rank 0 does)."""
    try:
        return from_env(os.environ).local_rank == 0
    except UsageError:
        return True


def vnode_plan(settings: Settings, vnode: int, nranks: int) -> NodePlan:
    """The plan of virtual node `vnode` of this host with `nranks` ranks, as `settings` ask:
    within the host's cpuset, or within the reservation named by --cpuset (its Linux and
    LWK lists)."""
    host = read_host(os.environ)
    linux_cores, lwk_cores = settings.linux_cores, settings.lwk_cores
    if settings.cpuset:
        if settings.mode != "lwk":
            raise UsageError("--cpuset reserves an LWK side: use it with --mode lwk")
        from mckmpi.node.cpuset import load

        r = load(settings.cpuset)
        host = replace(host, cpus=tuple(sorted(set(r.linux_cpus) | set(r.lwk_cpus))))
        linux_cores, lwk_cores = r.linux_cpus, r.lwk_cpus
    else:
        linux_cores, lwk_cores = slurm_binding(settings, host, linux_cores, lwk_cores)
    return plan_node(node_facts(host, settings.vnodes, vnode), nranks, mode=settings.mode,
                     linux_cores=linux_cores, lwk_cores=lwk_cores, mem=settings.mem,
                     oversubscribe=settings.oversubscribe)


def slurm_binding(settings: Settings, host: NodeFacts, linux_cores: Any, lwk_cores: Any
                  ) -> tuple[Any, Any]:
    """What Slurm says about the cores, where the user did not choose them: an lwk rank's
    Linux cores are the node's specialised CPUs (`srun --core-spec`/CPUSpecList, Slurm's
    cores for the system) and an explicit `srun --cpu-bind=map_cpu:LIST` names the ranks'
    (LWK) cores; either is said in one line by the node's first rank."""
    env = os.environ
    chosen = settings.origins.get("linux_cores") != "default" or \
        settings.origins.get("lwk_cores") != "default"
    if settings.mode != "lwk" or chosen or not env.get("SLURMD_NODENAME"):
        bind = env.get("SLURM_CPU_BIND_TYPE", "")
        if bind.startswith(("map_cpu", "mask_cpu")) and announces_errors():
            print(f"mckmpi: srun --cpu-bind={bind}{env.get('SLURM_CPU_BIND_LIST', '')} is "
                  "replaced: mckmpi pins every rank to its partition plan (choose the cores "
                  "with --lwk-cores/--linux-cores; --cpu-bind=none avoids this note)",
                  file=sys.stderr, flush=True)
        return linux_cores, lwk_cores
    bind = env.get("SLURM_CPU_BIND_TYPE", "")
    if bind.startswith("map_cpu"):
        mapped = tuple(int(c) for c in env.get("SLURM_CPU_BIND_LIST", "").split(",")
                       if c.strip().isdigit())
        if mapped and set(mapped) < set(host.cpus):
            if announces_errors():
                print(f"mckmpi: srun --cpu-bind=map_cpu:{format_cpulist(mapped)}: those are the "
                      "LWK cores, the rest of the node's CPUs the Linux cores",
                      file=sys.stderr, flush=True)
            return tuple(c for c in host.cpus if c not in mapped), tuple(sorted(set(mapped)))
    from mckmpi.node.partition import core_spec_linux_cores
    from mckmpi.jobs.slurm import SlurmError, specialised_cpus

    try:
        spec = specialised_cpus(env)
    except SlurmError:
        spec = ()
    linux = core_spec_linux_cores(host, spec) if spec else None
    if linux is None:
        return linux_cores, lwk_cores
    if announces_errors():
        print(f"mckmpi: Slurm's specialised CPUs {format_cpulist(linux)} (CPUSpecList of "
              f"{env['SLURMD_NODENAME']}) are the Linux cores", file=sys.stderr, flush=True)
    return linux, lwk_cores


def pin(plan: NodePlan, local_rank: int) -> None:
    """Main thread to the rank's cores; other threads to the Linux cores in lwk mode."""
    cpus = plan.rank(local_rank).cpus
    os.sched_setaffinity(0, cpus)
    if plan.mode != "lwk":
        return
    me = str(threading.get_native_id())
    for tid in os.listdir("/proc/self/task"):
        if tid != me:
            try:
                os.sched_setaffinity(int(tid), plan.linux_cpus)
            except (ProcessLookupError, OSError):
                pass  # a thread that ended meanwhile


def run(settings: Settings, app: App, argv: list[str]) -> int:
    """Run `app` as this rank; returns the exit status (errors after MPI init abort the job)."""
    placement = with_vnodes(from_env(os.environ), settings.vnodes)
    plan = vnode_plan(settings, placement.vnode, placement.local_size)
    if app.kind == "mpi-binary":
        # It is this rank's MPI process itself, run as our child: the harness must not init MPI.
        pin(plan, placement.local_rank)
        from mckmpi.external import run_external

        return run_external(settings, app, argv, placement, plan)

    from mckmpi.offload.session import policy_of

    policy = policy_of(settings)  # a bad prefix is a usage error before MPI, on every rank
    if plan.oversubscribed:
        # Ranks that share a core must not busy-poll while they wait for each other: Open MPI
        # yields when it knows it is oversubscribed, but it cannot see mckmpi's pinning.
        os.environ.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")

    from mpi4py import MPI

    world = MPI.COMM_WORLD
    try:
        return _run_in_mpi(settings, app, argv, placement, plan, policy, world)
    except UsageError as exc:
        if placement.local_rank == 0:
            print(f"mckmpi: error: {exc}", file=sys.stderr, flush=True)
        world.Abort(exc.exit_code)
    except BaseException:
        # A failure of the harness itself on one rank must not leave the others waiting.
        traceback.print_exc()
        sys.stderr.flush()
        world.Abort(1)
    return 1  # not reached: Abort does not return


def _run_in_mpi(settings: Settings, app: App, argv: list[str], placement: Placement,
                plan: NodePlan, policy: Policy, world: Any) -> int:
    from mckmpi.offload import session as offload
    from mckmpi.trace.clock import measure_offsets

    placement, node_comm = verify(placement, world)
    plans = node_comm.allgather(plan)
    if any(p != plan for p in plans):
        raise PartitionError(
            f"ranks of node {placement.node} computed different partition plans "
            f"({'; '.join(sorted({p.describe() for p in plans}))}): their cpusets differ"
        )
    offloaded = offload.start(policy, settings.offload_proxy, placement, plan, node_comm, world)
    if settings.cpuset:
        from mckmpi.node.cpuset import attach, load

        reservation = load(settings.cpuset)
        attach(reservation, "lwk", os.getpid())
        if offloaded is not None and offloaded.handle is not None:
            attach(reservation, "linux", offloaded.handle.pid)
    pin(plan, placement.local_rank)
    offset_ns, rtt_ns = measure_offsets(world)

    tracer = Tracer()
    rp = plan.rank(placement.local_rank)
    row = np.zeros((), dtype=RANKS_DTYPE)
    row["rank"], row["node"], row["local_rank"], row["vnode"] = (
        placement.rank, placement.node, placement.local_rank, placement.vnode)
    row["host"], row["pid"] = placement.host.encode()[:64], os.getpid()
    row["cpus"] = format_cpulist(rp.cpus).encode()
    row["linux_cpus"] = format_cpulist(plan.linux_cpus).encode()
    row["numa_node"], row["mem"] = rp.numa_node, rp.mem
    row["clock_offset_ns"], row["clock_rtt_ns"] = offset_ns, rtt_ns
    tracer.scalar("", "ranks", row)

    ctx = Context(placement=placement, mode=settings.mode, harness=True, tracer=tracer,
                  node_plan=plan, comm=world)
    runtime = None
    if settings.mode == "lwk":
        from mckmpi.lwk.runtime import LwkOptions, boot

        runtime = boot(LwkOptions.of(settings), plan, rp)
        ctx.mem, ctx.scheduler = runtime.arena, runtime.scheduler
    if offloaded is not None:
        ctx.offload = offloaded.attach(placement, node_comm, world,
                                       None if runtime is None else runtime.arena)
        pin(plan, placement.local_rank)  # the offload's watcher thread joins MPI's helpers
    set_context(ctx)
    started = time.monotonic_ns()
    if runtime is None:
        status = _run_app(app, world)
    else:
        # The app is the scheduler's first task, so it may yield, spawn and join anywhere.
        runtime.start_app()
        status = runtime.scheduler.run(lambda: _run_app(app, world))
    tracer.scalar("app", "wall_ns", time.monotonic_ns() - started, units="ns")
    if offloaded is not None:
        offloaded.finish(tracer)
    if runtime is not None:
        runtime.record(tracer)
        runtime.finish()
    set_context(None)

    path = _run_file_path(settings, app, placement, world)
    _write(world, path, tracer, settings, app, argv, placement, plan, node_comm)
    if placement.rank == 0:
        print(f"mckmpi: run file {path}", file=sys.stderr, flush=True)
    return status


def _run_app(app: App, world: Any) -> int:
    """Run the app in this interpreter, or an executable as a child that inherits the rank's
    pinning and offload filter; any unhandled exception or failed child aborts COMM_WORLD."""
    saved_argv, saved_path0 = sys.argv, sys.path[0]
    try:
        if app.kind == "binary":
            status = subprocess.run([app.target, *app.args], check=False).returncode
            if status:
                print(f"mckmpi: rank {world.Get_rank()}: {app.target} exited with status "
                      f"{status}", file=sys.stderr, flush=True)
                world.Abort(status if status > 0 else 128 - status)
        elif app.kind == "module":
            sys.argv = [app.target, *app.args]
            runpy.run_module(app.target, run_name="__main__", alter_sys=True)
        else:
            sys.argv = [app.target, *app.args]
            sys.path[0] = str(Path(app.target).resolve().parent)
            runpy.run_path(app.target, run_name="__main__")
    except SystemExit as exc:
        code = exc.code
        if code is None or code == 0:
            return 0
        if not isinstance(code, int):
            print(code, file=sys.stderr, flush=True)
            code = 1
        if world.Get_rank() != 0:
            # Rank 0 speaks for the job (apps report usage errors there): when it exits too,
            # its abort, not ours, ends the job, so its line is not lost in the teardown.
            time.sleep(ABORT_GRACE_S)
        world.Abort(code)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        world.Abort(1)
    finally:
        sys.argv, sys.path[0] = saved_argv, saved_path0
    return 0


def _run_file_path(settings: Settings, app: App, placement: Placement, world: Any) -> Path:
    """Rank 0 names the file (job id or time stamp) and tells everyone."""
    name = None
    if placement.rank == 0:
        out = Path(settings.out)
        if out.suffix == ".h5":
            out.parent.mkdir(parents=True, exist_ok=True)
            name = str(out)
        else:
            out.mkdir(parents=True, exist_ok=True)
            job = os.environ.get("SLURM_JOB_ID")
            step = os.environ.get("SLURM_STEP_ID")
            stamp = f"job{job}.{step}" if job else time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
            name = str(out / f"{app.name}-{settings.mode}-{stamp}.h5")
    return Path(world.bcast(name, root=0))


def _write(world: Any, path: Path, tracer: Tracer, settings: Settings, app: App, argv: list[str],
           placement: Placement, plan: NodePlan, node_comm: Any) -> None:
    from mckmpi.info import versions
    from mckmpi.trace.writer import write_run

    from mckmpi import provenance as prov

    node_name = placement.host if settings.vnodes == 1 else f"{placement.host}-v{placement.vnode}"
    nodes = prov.gather(world, node_comm.Get_rank() == 0, node_name)
    if world.Get_rank() == 0:
        prov.record(tracer, prov.job_facts(os.environ, app.kind, app.target, argv), nodes)
    hosts = sorted(set(world.allgather(placement.host)))
    node_plans = world.allgather(plan.describe() if node_comm.Get_rank() == 0 else None)
    root = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(argv),
        "app": app.target,
        "app_args": " ".join(app.args),
        "mode": settings.mode,
        "world_size": placement.size,
        "nnodes": placement.nnodes,
        "vnodes": settings.vnodes,
        "launcher": placement.launcher,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
        "slurm_nodelist": os.environ.get("SLURM_JOB_NODELIST", ""),
    }
    provenance: dict[str, Any] = dict(versions())
    provenance["hosts"] = hosts
    provenance["node_plans"] = [p for p in node_plans if p is not None]
    provenance["settings"] = [f"{k}={v} ({settings.origins[k]})" for k, v in sorted(settings.values.items())]
    write_run(world, path, tracer, root, provenance, method=settings.trace_writer)
