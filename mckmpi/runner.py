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
7. the run file, written collectively by all ranks. It is reserved (``NAME.h5.partial``)
   before the LWK runtime of 5 boots; a refusal before the app starts removes it, so a job
   that never ran leaves no file (what can be checked before MPI is checked there).
"""

from __future__ import annotations

import errno
import os
import runpy
import signal
import secrets
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from mckmpi import endings
from mckmpi.app import App
from mckmpi.config import Settings
from mckmpi.context import Context, current_context, set_context
from mckmpi.endings import SignalCatcher, parse_signals
from mckmpi.errors import MckmpiError, PartitionError, StorageError, UsageError, error_line
from mckmpi.offload.policy import Policy
from mckmpi.node.partition import NodePlan, node_facts, plan_node
from mckmpi.node.host import NodeFacts, read_host
from mckmpi.node.isolation import isolate_job, require_isolatable
from mckmpi.node.kernelnoise import start_on_node
from mckmpi.node.placement import Placement, from_env, verify, with_vnodes
from mckmpi.trace.schema import RANKS_DTYPE
from mckmpi.trace.tracer import Tracer
from mckmpi.utility.units import format_cpulist


#: How long a failed app waits for its proxy's hang-up to show before it reports itself.
PROXY_LOST_WAIT_S = 1.0

#: How long a rank other than 0 that exits with an error waits before aborting the job.
ABORT_GRACE_S = 1.0


def announces_errors() -> bool:
    """Whether this rank reports errors that every rank finds (node-local rank 0 does)."""
    try:
        return from_env(os.environ).local_rank == 0
    except UsageError:
        return True


def refuse(exc: MckmpiError) -> int:
    """End this rank on an error found before MPI starts, with exactly one line per node.

    The node's rank 0 prints it; the others wait ABORT_GRACE_S first, since a launcher
    kills the job when the first rank exits and rank 0 may still be on its way to its line
    (2 runs in 10 printed nothing when the other ranks left at once). A rank still alive
    after the wait found an error its rank 0 did not, and says so too. Under Open MPI's
    mpiexec the ranks end with MPI_Abort and Open MPI's help texts off: a plain non-zero
    exit would add mpiexec's ten-line report of it under the line.
    """
    world = None
    if "OMPI_COMM_WORLD_SIZE" in os.environ:
        os.environ.setdefault("OMPI_MCA_orte_execute_quiet", "1")
        from mpi4py import MPI  # MPI_Init waits for every rank: all get here before any ends

        world = MPI.COMM_WORLD
    if not announces_errors():
        time.sleep(ABORT_GRACE_S)  # still here: the node's rank 0 did not end the job
    print(exc.line(), file=sys.stderr, flush=True)
    if world is not None:
        world.Abort(exc.exit_code)
    return exc.exit_code


def check_hand_started_proxy(settings: Settings, policy: Policy) -> None:
    """--offload-proxy, before MPI starts: refused at once where no proxy can ever listen
    (a file that is not a socket, a socket nobody listens on, a directory the proxy cannot
    create); where one may still come (its `mckmpi proxy` starts beside the ranks), the
    node's rank 0 says that it waits, and how long."""
    import socket
    import stat

    from mckmpi.offload.session import HAND_STARTED_WAIT_S

    path = Path(settings.offload_proxy)
    name = f"--offload-proxy {path}"
    if not policy.active:
        if announces_errors():
            print(f"mckmpi: note: {settings.blame(name)} is not used: nothing is offloaded "
                  f"(--offload {settings.offload} in {settings.mode} mode)", file=sys.stderr,
                  flush=True)
        return
    try:
        st = path.stat()
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise UsageError(settings.blame(f"{name}: {exc.strerror}")) from None
    if st is not None and not stat.S_ISSOCK(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a file"
        raise UsageError(settings.blame(f"{name} is {kind}, not the socket of a proxy (`mckmpi "
                                        f"proxy --socket PATH` creates it)"))
    if st is not None:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            raise UsageError(settings.blame(
                f"{name}: no proxy listens on this socket (left by a proxy that ended?): "
                f"start `mckmpi proxy --socket {path}` first")) from None
        except OSError as exc:
            raise UsageError(settings.blame(f"{name}: {exc.strerror}")) from None
        finally:
            probe.close()
        return
    parent = path.absolute().parent
    if parent.exists() and not parent.is_dir():
        raise UsageError(settings.blame(f"{name}: {parent} is not a directory"))
    if not parent.exists() and not (parent.parent.is_dir()
                                    and os.access(parent.parent, os.W_OK | os.X_OK)):
        raise UsageError(settings.blame(
            f"{name}: no proxy can listen there: {parent} does not exist and cannot be "
            f"created in {parent.parent}"))
    if announces_errors():
        print(f"mckmpi: waiting up to {HAND_STARTED_WAIT_S:g} s for the offload proxy at {path} "
              f"(--offload-proxy; started by `mckmpi proxy --socket {path}`)",
              file=sys.stderr, flush=True)


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

        try:
            r = load(settings.cpuset)
        except UsageError as exc:
            raise UsageError(settings.blame(f"--cpuset {settings.cpuset}: {exc}")) from None
        host = replace(host, cpus=tuple(sorted(set(r.linux_cpus) | set(r.lwk_cpus))))
        linux_cores, lwk_cores = r.linux_cpus, r.lwk_cpus
    else:
        linux_cores, lwk_cores = slurm_binding(settings, host, linux_cores, lwk_cores)
    try:
        return plan_node(node_facts(host, settings.vnodes, vnode), nranks, mode=settings.mode,
                         linux_cores=linux_cores, lwk_cores=lwk_cores, mem=settings.mem,
                         oversubscribe=settings.oversubscribe)
    except PartitionError as exc:
        raise PartitionError(settings.blame(str(exc))) from None


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
    from mckmpi.utility.outputs import run_file_target

    if settings.tag:  # every process of the job carries it: its proxy, the app's children
        os.environ["MCKMPI_TAG"] = settings.tag
    policy = policy_of(settings)  # a bad prefix is a usage error before MPI, on every rank
    if settings.offload_proxy:
        check_hand_started_proxy(settings, policy)
    if settings.isolate:
        require_isolatable(plan)
    if settings.mode == "lwk":
        from mckmpi.lwk.runtime import LwkOptions, preflight

        preflight(LwkOptions.of(settings), plan)
    run_file_target(settings.out)  # an --out that cannot be written, found before the job
    # Open MPI's help text on the ranks (MPI_ABORT's banner after our one line) is noise
    # here; mpiexec's own messages (no slots, no such program) are not affected.
    os.environ.setdefault("OMPI_MCA_orte_execute_quiet", "1")
    if plan.oversubscribed:
        # Ranks that share a core must not busy-poll while they wait for each other: Open MPI
        # yields when it knows it is oversubscribed, but it cannot see mckmpi's pinning.
        os.environ.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")

    endings.wrap_mpi_abort()  # before MPI is loaded: the app's own MPI_Abort is recorded
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    try:
        return _run_in_mpi(settings, app, argv, placement, plan, policy, world)
    except endings.JobSignal as exc:
        # Signalled before the app started (every rank is): nothing to record yet.
        return 128 + exc.signum
    except StorageError as exc:
        # Every rank raised it together (an agreed decision): one line, no abort.
        if placement.rank == 0:
            print(exc.line(), file=sys.stderr, flush=True)
        return exc.exit_code
    except MckmpiError as exc:
        endings.on_mpi_abort(None)  # the harness's own abort below is not the app's
        try:
            if _proxy_lost(exc):
                # a request to the proxy failed because it is gone: the offload's watcher
                # says so in one line (the node's rank 0 first) and aborts the job
                time.sleep(PROXY_LOST_WAIT_S + offload_grace())
            elif placement.local_rank != 0:
                # the node's rank 0 finds the same error and aborts the job meanwhile; a
                # rank still here found one of its own, and says so
                time.sleep(ABORT_GRACE_S)
        except endings.JobSignal as signalled:
            # the launcher ends the job meanwhile (another rank's abort said why)
            return 128 + signalled.signum
        print(exc.line(), file=sys.stderr, flush=True)
        world.Abort(exc.exit_code)
    except BaseException:
        # A failure of the harness itself on one rank must not leave the others waiting.
        endings.on_mpi_abort(None)
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
    offloaded = offload.start(policy, settings.offload_proxy, placement, plan, node_comm, world,
                              tag=settings.tag)
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

    # The run file exists from here on (NAME.h5.partial + the ranks' spools), before the
    # LWK boot and the offload filter: the streamer's spool descriptor stays native.
    catcher = SignalCatcher.install(parse_signals(settings.signal))
    run_file = _start_run_file(world, tracer, settings, app, argv, placement, plan, node_comm,
                               offset_ns, catcher)
    ctx = Context(placement=placement, mode=settings.mode, harness=True, tracer=tracer,
                  node_plan=plan, comm=world)
    runtime = None
    try:
        # Refusals from here to the app's start are what only the set-up finds (the
        # options were checked before MPI): the reserved run file recorded nothing, so
        # it goes (a refusal must leave no file behind).
        if settings.mode == "lwk":
            from mckmpi.lwk.runtime import LwkOptions, boot

            runtime = boot(LwkOptions.of(settings), plan, rp)
            ctx.mem, ctx.scheduler = runtime.arena, runtime.scheduler
        if offloaded is not None:
            ctx.offload = offloaded.attach(
                placement, node_comm, world, None if runtime is None else runtime.arena,
                before_abort=lambda message: run_file.abandon(endings.ending(
                    "proxy", placement.rank, offset_ns, offload.EXIT_PROXY_DIED, error=message)))
            pin(plan, placement.local_rank)  # the offload's watcher thread joins MPI's helpers
            run_file.add_source(lambda: offloaded.snapshot(tracer))  # calls stream as they happen
        set_context(ctx)
        isolated = isolate_job(settings.isolate, plan, node_comm, settings.cpuset)
        ctx.phase_marks = kernel = start_on_node(plan, node_comm)  # the kernel's doings from here
    except MckmpiError:
        run_file.discard()
        raise
    started = time.monotonic_ns()

    def aborted(errorcode: int) -> None:
        # The app called MPI_Abort: its ending and data go to the spool before the abort.
        if run_file.ended:
            return  # the harness's own abort (a lost proxy): its ending and line are said
        end = endings.of_abort(errorcode, placement.rank, offset_ns)
        run_file.abandon(end)
        print(error_line(end["error"]), file=sys.stderr, flush=True)

    endings.on_mpi_abort(aborted)
    if runtime is None:
        end = _run_app(app, placement.rank, offset_ns)
    else:
        # The app is the scheduler's first task, so it may yield, spawn and join anywhere.
        runtime.start_app()
        run_file.add_source(lambda: runtime.snapshot(tracer))  # counters stream as they grow
        end = runtime.scheduler.run(lambda: _run_app(app, placement.rank, offset_ns))
    endings.on_mpi_abort(None)  # from here on, an abort is the harness's (its ending is set)
    catcher.quiet()
    tracer.scalar("app", "wall_ns", time.monotonic_ns() - started, units="ns")
    if kernel is not None:
        kernel.stop(tracer)
    if isolated is not None:
        isolated.finish(tracer)
    if offloaded is not None:
        offloaded.finish(tracer)
    if runtime is not None:
        runtime.record(tracer)
        runtime.finish()
    set_context(None)
    return _end(world, run_file, tracer, end, placement, catcher, settings.catalogue == "on")


def _end(world: Any, run_file: Any, tracer: Tracer, end: dict[str, Any],
         placement: Placement, catcher: SignalCatcher, catalogue: bool) -> int:
    """The rank's ending, in one place. A normal end or a signal (which every rank of a
    cancelled job receives) finishes the run file with all ranks; an exit status or an
    exception on one rank may leave the others blocked in the app, so that rank records its
    ending and data in its spool and aborts the job, like ``python -m mpi4py``. With
    `catalogue`, rank 0 adds a normally ended run to its directory's catalogue."""
    if end["ending"] in ("normal", "signal"):
        path = run_file.finish(tracer, end)
        catcher.restore()
        if placement.rank == 0:
            print(f"mckmpi: run file {path}" + ("" if end["ending"] == "normal" else
                  f" (ended by {end['signal']})"), file=sys.stderr, flush=True)
        if placement.rank == 0 and end["ending"] == "normal" and catalogue:
            # a signalled job keeps its grace period for the file; `mckmpi runs index` adds it
            from mckmpi.analysis.catalogue import add_finished_run

            warning = add_finished_run(path)
            if warning:
                print(warning, file=sys.stderr, flush=True)
        return end["exit_status"]
    run_file.abandon(end)
    if placement.rank != 0:
        # Rank 0 speaks for the job (apps report usage errors there): when it exits too,
        # its abort, not ours, ends the job, so its line is not lost in the teardown (and
        # an I/O error all ranks met is said once).
        time.sleep(ABORT_GRACE_S)
        if end["ending"] == "exit" and end["error"]:  # still here: rank 0 did not exit
            print(f"mckmpi: {end['error']}", file=sys.stderr, flush=True)
    if end["ending"] == "io-error" and not (placement.rank != 0 and catcher.caught):
        # (a rank signalled meanwhile: another rank's abort is ending the job, it spoke)
        print(f"mckmpi: error: {end['error']}", file=sys.stderr, flush=True)
    world.Abort(end["exit_status"] if 0 < end["exit_status"] < 256 else 1)
    return 1  # not reached


def _run_app(app: App, rank: int, offset_ns: int) -> dict[str, Any]:
    """Run the app in this interpreter, or an executable as a child that inherits the rank's
    pinning and offload filter; how it ended (see `mckmpi.endings`)."""
    saved_argv, saved_path0 = sys.argv, sys.path[0]
    try:
        if app.kind == "binary":
            status = subprocess.run([app.target, *app.args], check=False).returncode
            end = endings.of_child(status, app.target, rank, offset_ns)
            if status < 0 or (status and rank == 0):
                # a signal at once; another rank's exit status after the grace (`_end`)
                print(f"mckmpi: {end['error']}", file=sys.stderr, flush=True)
            return end
        if app.kind == "module":
            sys.argv = [app.target, *app.args]
            runpy.run_module(app.target, run_name="__main__", alter_sys=True)
        else:
            sys.argv = [app.target, *app.args]
            sys.path[0] = str(Path(app.target).resolve().parent)
            runpy.run_path(app.target, run_name="__main__")
    except SystemExit as exc:
        if exc.code is not None and not isinstance(exc.code, int) and rank == 0:
            print(exc.code, file=sys.stderr, flush=True)
        elif isinstance(exc.code, int) and exc.code and rank == 0:
            # the status is passed on: said, so that 2 is not read as mckmpi's own (another
            # rank says it after the grace, see `_end`)
            print(f"mckmpi: rank {rank}: {app.target} exited with status {exc.code}",
                  file=sys.stderr, flush=True)
        return endings.of_exception(exc, rank, offset_ns)
    except (endings.JobSignal, StorageError) as exc:
        return endings.of_exception(exc, rank, offset_ns)
    except BaseException as exc:
        if _proxy_lost(exc):
            # The app failed because the node proxy is gone (its calls got ENOSYS): the
            # offload's watcher says so in one line and aborts the job; a traceback of the
            # app's symptom would only bury that line.
            time.sleep(PROXY_LOST_WAIT_S + offload_grace())
        traceback.print_exc()
        sys.stderr.flush()
        return endings.of_exception(exc, rank, offset_ns)
    finally:
        sys.argv, sys.path[0] = saved_argv, saved_path0
    return endings.ending("normal", rank, offset_ns)


def offload_grace() -> float:
    """How long the node's other ranks leave its rank 0 to report a lost proxy."""
    from mckmpi.offload.session import ABORT_GRACE_S as grace

    return grace


def _proxy_lost(exc: BaseException) -> bool:
    """Whether the app's exception comes from a lost offload proxy: the proxy hung up, or
    a call failed with ENOSYS and the hang-up shows within PROXY_LOST_WAIT_S."""
    ctx = current_context()
    if ctx is None or ctx.offload is None:
        return False
    chain: BaseException | None = exc
    enosys = False
    while chain is not None and not enosys:
        enosys = getattr(chain, "errno", None) == errno.ENOSYS or "Function not implemented" in str(chain)
        chain = chain.__cause__ or chain.__context__
    return ctx.offload.lost(PROXY_LOST_WAIT_S if enosys else 0.0)


def run_file_name(out: Path, app: App, mode: str, env: dict[str, str] | os._Environ,
                  suffix: str) -> Path:
    """The run file's name in directory `out`: app, mode, the Slurm cluster, job and step
    (or a time stamp outside Slurm) and a short random `suffix`, so names stay unique when
    job ids repeat (a new cluster, two clusters, a restarted controller)."""
    job = env.get("SLURM_JOB_ID")
    if job:
        cluster = env.get("SLURM_CLUSTER_NAME", "")
        stamp = f"{cluster + '-' if cluster else ''}job{job}.{env.get('SLURM_STEP_ID', '0')}"
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
    return out / f"{app.name}-{mode}-{stamp}-{suffix}.h5"


def _reserve_run_file(settings: Settings, app: App, placement: Placement, world: Any) -> Path:
    """Rank 0 names the file and creates NAME.h5.partial exclusively (a name is never
    reused, a file never overwritten); every rank learns the name or the same error."""
    from mckmpi.trace.writer import agree, describe, reserve_name

    name, failure = None, None
    if placement.rank == 0:
        out = Path(settings.out)
        try:
            if out.suffix == ".h5":
                out.parent.mkdir(parents=True, exist_ok=True)
                reserve_name(out)
                name = out
            else:
                out.mkdir(parents=True, exist_ok=True)
                for _ in range(16):
                    candidate = run_file_name(out, app, settings.mode, os.environ,
                                              secrets.token_hex(3))
                    try:
                        reserve_name(candidate)
                    except FileExistsError:
                        continue
                    name = candidate
                    break
                else:
                    raise FileExistsError(errno.EEXIST, "no free run file name", str(out))
        except OSError as exc:
            failure = describe(exc, out)
            if isinstance(exc, FileExistsError) and out.suffix == ".h5":
                failure = (errno.EEXIST, f"{out} exists: run files are never overwritten "
                                         "(choose another --out)")
    agree(world, failure)
    return Path(world.bcast(None if name is None else str(name), root=0))


def _start_run_file(world: Any, tracer: Tracer, settings: Settings, app: App, argv: list[str],
                    placement: Placement, plan: NodePlan, node_comm: Any, offset_ns: int,
                    catcher: SignalCatcher) -> Any:
    """The run file's header and the streamer (collective)."""
    from mckmpi.info import versions
    from mckmpi.trace.writer import RunFile

    from mckmpi import provenance as prov

    path = _reserve_run_file(settings, app, placement, world)
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
        "slurm_cluster": os.environ.get("SLURM_CLUSTER_NAME", "") if os.environ.get(
            "SLURM_JOB_ID") else "",
    }
    provenance: dict[str, Any] = dict(versions())
    provenance["hosts"] = hosts
    provenance["node_plans"] = [p for p in node_plans if p is not None]
    provenance["settings"] = [f"{k}={v} ({settings.origins[k]})"
                              for k, v in sorted(settings.values.items())]

    def spool_failed(exc: OSError) -> None:
        from mckmpi.trace.writer import describe

        catcher.interrupt(StorageError(describe(exc, run_file.spool)[1], exc.errno or 0))

    def signalled(signum: int) -> None:
        # In the streamer's thread, right after it flushed: the ending is on disk even if
        # the main thread is stuck in C until Slurm's SIGKILL.
        run_file.streamer.ending(endings.of_signal(signum, placement.rank, offset_ns))
        if placement.rank == 0:
            # Said now: mpiexec sends SIGKILL a second after SIGTERM, maybe before the run
            # file is finished (its own line follows when it is).
            os.write(2, f"{error_line(f'job terminated by {signal.Signals(signum).name}')}\n"
                        .encode())
        ctx = current_context()
        for cleanup in [] if ctx is None else ctx.cleanups:
            try:
                cleanup()
            except Exception:  # noqa: BLE001 - the job is ending: the other clean-ups still run
                pass

    run_file = RunFile.start(world, path, tracer, root, provenance, settings.trace_writer,
                             flush_s=settings.trace_flush, wake_fd=catcher.wake_fd,
                             on_signal=signalled, on_error=spool_failed, reserved=True)
    return run_file
