"""Checkpoint: a compute loop that writes its state every K iterations and verifies it.

Each rank evolves a state of --elements float64 values with a chaotic map (bitwise
reproducible, never decaying), with one allreduce per iteration that couples the ranks as a
bulk-synchronous code would. The run has two phases of --iterations each: first without
checkpoints (the baseline throughput), then writing the state every --every iterations to
its own file (two alternating slots per rank, so the previous checkpoint survives a failed
write). Every checkpoint is read back and compared with what was written; at the end the
run restarts from a checkpoint on disk, recomputes up to the last iteration and must reach
the final state bit for bit.

Writing modes:
- default (synchronous): the compute loop writes, reads back and compares, then goes on;
- --async: the state is copied to a snapshot buffer (in the arena in lwk mode) and written
  while the loop computes; the next checkpoint waits for the previous one. How:
  - `channel` (lwk mode with offloaded I/O): a writer task queues write, [fsync,] read-back
    of the snapshot on the asynchronous offload channel and waits for their completions
    without blocking the compute task, which yields once per iteration (and so polls the
    channel). The proxy does the I/O on a Linux core straight from the arena: the rank's
    core only copies the snapshot and compares the read-back;
  - `scheduler` (lwk mode, I/O not offloaded): the writer task hands the snapshot to a worker
    thread (`WorkerPool`) on the rank's first CPU and waits for it likewise;
  - `thread` (linux mode): the loop hands it to that worker thread directly.
  On a rank with a single core a worker thread shares that core, so the overlap hides I/O
  waits rather than CPU time; the channel moves the I/O off the core.

Records: app/iter_ns, app/compute_ns, app/comm_ns (the allreduce), app/ckpt_ns (time the
loop spent on checkpointing: copy, write and verify, or waiting for the previous write)
[ranks, iterations] of the checkpointed phase, app/base_iter_ns of the baseline phase;
table app/checkpoints (iter, start_ns, bytes, write_ns, verify_ns), all streamed while the
app runs; scalars
app/throughput_base and app/throughput_ckpt (iterations per second); attrs of app: name,
elements, iterations, every, async_mode (sync | thread | scheduler | channel), fsync,
verified.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from mpi4py import MPI

import mckmpi
from mckmpi import appkit
from mckmpi.appkit import clock
from mckmpi.utility.table import counted

RATE = 3.9  # the logistic map's parameter: chaotic, values stay in (0, 1)
CKPT_DTYPE = np.dtype([("iter", "i4"), ("start_ns", "i8"), ("bytes", "i8"), ("write_ns", "i8"),
                       ("verify_ns", "i8")])


#: Exit status of a checkpoint that could not be written (sysexits.h EX_IOERR).
EX_IOERR = 74


def parse(argv: list[str]) -> tuple[appkit.AppParser, argparse.Namespace]:
    p = appkit.parser("checkpoint", __doc__)
    p.add_argument("--elements", type=appkit.positive_int, default=1 << 20,
                   help="float64 values of state per rank [1048576 = 8 MiB]")
    p.add_argument("--iterations", type=appkit.positive_int, default=100,
                   help="iterations of each phase [100]")
    p.add_argument("--warmup", type=appkit.nonnegative_int, default=5,
                   help="untimed iterations before the baseline phase [5]")
    p.add_argument("--every", type=appkit.positive_int, default=10,
                   help="checkpoint every K iterations [10]")
    p.add_argument("--async", dest="async_", action="store_true",
                   help="overlap writing with compute (see above)")
    p.add_argument("--fsync", action="store_true", help="fsync every checkpoint before verifying it")
    p.add_argument("--dir", default=None,
                   help="where checkpoint files go (created if missing, kept) "
                        "[a fresh temporary directory, removed at the end]")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint files")
    args = p.parse_args(argv)
    if args.every > args.iterations:
        p.error(f"--every {args.every} exceeds --iterations {args.iterations}: "
                "no checkpoint would be written")
    return p, args


def step(state: np.ndarray, tmp: np.ndarray) -> None:
    """state = RATE * state * (1 - state), in place."""
    np.multiply(state, state, out=tmp)
    np.subtract(state, tmp, out=state)
    np.multiply(state, RATE, out=state)


def write_and_verify(path: str, data: np.ndarray, readbuf: np.ndarray, same: np.ndarray,
                     fsync: bool) -> tuple[int, int, int, bool]:
    """Write `data` to `path`, read it back and compare: (start, write ns, verify ns, equal)."""
    t0 = clock()
    view = memoryview(data).cast("B")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:])
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    t1 = clock()
    back = memoryview(readbuf).cast("B")
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < len(back):
            got = os.readv(fd, [back[done:]])
            if got == 0:
                break
            done += got
    finally:
        os.close(fd)
    np.equal(readbuf, data, out=same)
    equal = done == len(back) and bool(same.all())
    return t0, t1 - t0, clock() - t1, equal


class Checkpointer:
    """Takes checkpoints synchronously, on a worker thread, via a scheduler task and a
    worker thread, or via a scheduler task and the asynchronous offload channel."""

    def __init__(self, mode: str, paths: list[str], mem: Any, elements: int, count: int,
                 fsync: bool, sched: Any, tracer: Any, offload: Any = None) -> None:
        self.mode = mode
        self.paths = paths
        self.fsync = fsync
        self.readbuf = mem.empty(elements)
        self.same = mem.empty(elements, dtype=np.bool_)
        self.snapshot = mem.empty(elements) if mode != "sync" else None
        self.log = np.zeros(count, dtype=CKPT_DTYPE)
        # One row per checkpoint, streamed into the run file as each one completes.
        self.logged = tracer.stream("app", "checkpoints", self.log, units={
            "start_ns": "ns", "bytes": "B", "write_ns": "ns", "verify_ns": "ns"})
        self.ok = True
        self.error: OSError | None = None  # a writer task's failure, raised by `wait`
        self.sched = sched
        self.pool = None
        self.job = None
        self.pending = self.pending_iter = -1
        self.channel = None
        if mode in ("thread", "scheduler"):
            from mckmpi.lwk.workers import WorkerPool

            self.pool = WorkerPool([min(os.sched_getaffinity(0))])
        if mode == "channel":
            self.channel = offload.channel(slots=8)
            self.channel.register(sched)
        if mode in ("scheduler", "channel"):
            from mckmpi.lwk.scheduler import Event

            self.ready, self.idle = Event("snapshot ready"), Event("writer idle")
            self.idle.set()
            self.stopping = False
            self.writer = sched.spawn(self._writer if mode == "scheduler" else self._queuer,
                                      name="checkpoint-writer")

    def take(self, c: int, iteration: int, state: np.ndarray) -> None:
        """Checkpoint `c` of `state`; returns as soon as `state` may change again."""
        if self.mode == "sync":
            path = self.paths[c % 2]
            self._done(c, iteration, _named(path, write_and_verify, path, state, self.readbuf,
                                            self.same, self.fsync))
            return
        self.wait()
        np.copyto(self.snapshot, state)
        self.pending, self.pending_iter = c, iteration
        if self.mode == "thread":
            self.job = self.pool.submit(write_and_verify, self.paths[c % 2], self.snapshot,
                                        self.readbuf, self.same, self.fsync)
        else:  # scheduler, channel
            self.idle.clear()
            self.ready.set()
            self.sched.yield_()  # let the writer hand the snapshot to the pool now

    def wait(self) -> None:
        """Until the write in flight (if any) is done and verified; its OSError if it
        failed (ENOSPC, EIO, ... as the system call returned it)."""
        if self.mode == "thread" and self.job is not None:
            job, self.job = self.job, None
            path = self.paths[self.pending % 2]
            self._done(self.pending, self.pending_iter, _named(path, job.result))
        elif self.mode in ("scheduler", "channel"):
            self.idle.wait()
            if self.error is not None:
                raise self.error

    def abandon(self) -> None:
        """After a failure: stop the writer and its pool or channel without waiting."""
        if self.mode in ("scheduler", "channel"):
            self.stopping = True
            self.ready.set()
        if self.pool is not None:
            self.pool.close()
        if self.channel is not None:
            self.sched.remove_poller(self.channel.poll)
            self.channel.close()

    def close(self) -> None:
        self.wait()
        if self.mode in ("scheduler", "channel"):
            self.stopping = True
            self.ready.set()
            self.sched.join(self.writer)
        if self.pool is not None:
            self.pool.close()
        if self.channel is not None:
            self.sched.remove_poller(self.channel.poll)
            self.channel.close()

    def _failing(self, body: Any) -> None:
        """Run a writer task's loop; a failure goes to `error` for the compute task's next
        `wait`, instead of ending this task with nobody waiting for it."""
        try:
            body()
        except OSError as exc:
            self.error = exc
            self.idle.set()

    def _writer(self) -> None:
        self._failing(self._write_loop)

    def _write_loop(self) -> None:
        while True:
            self.ready.wait()
            self.ready.clear()
            if self.stopping:
                return
            path = self.paths[self.pending % 2]
            job = self.pool.submit(write_and_verify, path, self.snapshot, self.readbuf,
                                   self.same, self.fsync)
            self._done(self.pending, self.pending_iter, _named(path, job.result))  # this task
            self.idle.set()

    def _queuer(self) -> None:
        self._failing(self._queue_loop)

    def _queue_loop(self) -> None:
        """The channel's writer task: queue write, [fsync,] read-back; wait for the read."""
        from mckmpi.lwk.scheduler import Event

        nbytes = self.snapshot.nbytes
        while True:
            self.ready.wait()
            self.ready.clear()
            if self.stopping:
                return
            fd = os.open(self.paths[self.pending % 2], os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            read_back, results, times = Event("checkpoint read back"), [], [clock()]

            def done(result: int, last: bool = False) -> None:
                results.append(result)
                times.append(clock())
                if last:
                    read_back.set()

            self.channel.write(fd, 0, self.snapshot, on_done=done)
            if self.fsync:
                self.channel.fsync(fd, on_done=lambda result: results.append(result))
            self.channel.read(fd, 0, self.readbuf, on_done=lambda result: done(result, True))
            read_back.wait()  # blocks this task only; the compute task's yields poll the ring
            path = self.paths[self.pending % 2]
            written, got = results[0], results[-1]
            try:
                if min(results) < 0:
                    raise OSError(-min(results), os.strerror(-min(results)), path)
                if written < nbytes:
                    # A short write, as on a nearly full disk: write the rest as a program
                    # would, which returns the real errno (ENOSPC) or completes it.
                    view = memoryview(self.snapshot).cast("B")
                    while written < nbytes:
                        written += _named(path, os.pwrite, fd, view[written:], written)
                    got = _named(path, os.preadv, fd, [memoryview(self.readbuf).cast("B")], 0)
            finally:
                os.close(fd)
            np.equal(self.readbuf, self.snapshot, out=self.same)
            equal = written == nbytes and got == nbytes and bool(self.same.all())
            self._done(self.pending, self.pending_iter,
                       (times[0], times[1] - times[0], clock() - times[1], equal))
            self.idle.set()

    def _done(self, c: int, iteration: int, result: tuple[int, int, int, bool]) -> None:
        start, write_ns, verify_ns, equal = result
        self.log[c] = (iteration, start, self.readbuf.nbytes, write_ns, verify_ns)
        self.logged.filled = c + 1
        self.ok = self.ok and equal


def _named(path: str, call: Any, *args: Any) -> Any:
    """`call(*args)`, its OSError naming `path` (the errno exactly as the system returned it)."""
    try:
        return call(*args)
    except OSError as exc:
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror, path) from None
        raise


def checkpoint_dir(p: appkit.AppParser, args: argparse.Namespace, comm: Any) -> tuple[Path, bool]:
    """The directory of the files, and whether it is a temporary one (removed at the end);
    a --dir of the user's stays, and only the run's own files leave it. A directory that
    cannot be used is a usage error on every rank alike."""
    temporary = args.dir is None
    name, problem = args.dir, None
    if temporary and comm.Get_rank() == 0:
        try:
            name = tempfile.mkdtemp(prefix="mckmpi-checkpoint-")
        except OSError as exc:
            problem = f"cannot create a temporary directory: {exc.strerror}"
    if temporary:
        name, problem = comm.bcast((name, problem), root=0)
    if problem is None:
        try:
            Path(name).mkdir(parents=True, exist_ok=True)  # ranks on other nodes too
            if not os.access(name, os.W_OK | os.X_OK):
                problem = f"--dir {name}: not writable"
        except OSError as exc:
            problem = f"--dir {name}: {exc.strerror}"
    problem = next((x for x in comm.allgather(problem) if x), None)
    if problem is not None:
        p.error(problem)
    return Path(name), temporary


def main(argv: list[str] | None = None) -> None:
    p, args = parse(sys.argv[1:] if argv is None else argv)
    ctx = mckmpi.context()
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    inj = appkit.injector(args, p, comm)
    mem = ctx.mem
    n, every = args.iterations, args.every
    count = n // every
    mode = ("sync" if not args.async_ else "thread" if ctx.scheduler is None
            else "channel" if ctx.offload is not None and ctx.offload.zero_copy else "scheduler")
    directory, temporary = checkpoint_dir(p, args, comm)
    paths = [str(directory / f"ckpt-r{rank:05d}-{slot}.bin") for slot in (0, 1)]

    def drop_temporary() -> None:
        """A temporary directory never outlives the run, however it ends."""
        if temporary and not args.keep and rank == 0:
            shutil.rmtree(directory, ignore_errors=True)

    ctx.on_end(drop_temporary)  # a cancelled job too, even if this rank is stuck in MPI

    state = mem.empty(args.elements)
    state[...] = np.random.default_rng(rank).uniform(0.1, 0.9, args.elements)
    tmp = mem.empty(args.elements)
    loc, glob = mem.zeros(1), mem.zeros(1)
    base_iter_ns = mem.zeros(n, dtype=np.int64)
    iter_ns, compute_ns, comm_ns, ckpt_ns = (mem.zeros(n, dtype=np.int64) for _ in range(4))
    walls = [0, 0]
    sched = ctx.scheduler if mode in ("scheduler", "channel") else None
    tracer = ctx.tracer
    base_times = tracer.stream("app", "base_iter_ns", base_iter_ns, units="ns")
    times = appkit.stream_phases(tracer, iter_ns, compute_ns, comm_ns, ckpt_ns=ckpt_ns)
    writer = Checkpointer(mode, paths, mem, args.elements, count, args.fsync, sched, tracer,
                          ctx.offload)

    def run() -> None:
        c = clock
        for _ in range(args.warmup):
            step(state, tmp)
            comm.Allreduce(loc, glob, op=MPI.SUM)
        inj.start(comm)
        start = c()
        for i in range(n):
            t0 = c()
            step(state, tmp)
            loc[0] = state.sum()
            t1 = c()
            if t1 >= inj.due:
                inj.fire()
                t1 = c()
            comm.Allreduce(loc, glob, op=MPI.SUM)
            base_iter_ns[i] = c() - t0
            base_times.filled = i + 1
        walls[0] = c() - start
        comm.Barrier()
        start = c()
        for i in range(n):
            t0 = c()
            step(state, tmp)
            loc[0] = state.sum()
            t1 = c()
            if t1 >= inj.due:
                inj.fire()
                t1 = c()
            comm.Allreduce(loc, glob, op=MPI.SUM)
            t2 = c()
            if (i + 1) % every == 0:
                writer.take((i + 1) // every - 1, i + 1, state)
            elif sched is not None:
                sched.yield_()
            t3 = c()
            iter_ns[i] = t3 - t0
            compute_ns[i] = t1 - t0
            comm_ns[i] = t2 - t1
            ckpt_ns[i] = t3 - t2
            times.filled = i + 1
        writer.wait()
        walls[1] = c() - start
        inj.stop()
        writer.close()

    try:
        appkit.run_phases(ctx, run)
    except OSError as exc:
        # A full or failing disk: one line with the errno; the harness ends the job.
        writer.abandon()
        print(f"checkpoint: error: rank {rank}: {exc}", file=sys.stderr, flush=True)
        drop_temporary()
        sys.exit(EX_IOERR)
    except BaseException:
        drop_temporary()  # a signal (the job cancelled) unwinds the app through here
        raise
    # Restart: the newest checkpoint before the end (the older slot if the newest is the end).
    c = count - 2 if count >= 2 and count * every == n else count - 1
    restart = writer.readbuf
    with open(paths[c % 2], "rb", buffering=0) as fh:
        fh.readinto(memoryview(restart).cast("B"))
    for _ in range((c + 1) * every, n):  # the restart continues the checkpointed phase
        step(restart, tmp)
    restarted = bool(np.array_equal(restart, state))
    if not args.keep:
        for path in paths:
            Path(path).unlink(missing_ok=True)
    comm.Barrier()
    drop_temporary()
    verified = comm.allreduce(writer.ok and restarted, op=MPI.LAND)

    base_rate, ckpt_rate = n / walls[0] * 1e9, n / walls[1] * 1e9
    tracer.scalar("app", "throughput_base", base_rate, units="1/s")
    tracer.scalar("app", "throughput_ckpt", ckpt_rate, units="1/s")
    tracer.attrs("app", name="checkpoint", elements=args.elements, iterations=n, every=every,
                 async_mode=mode, fsync=args.fsync, verified=verified)
    inj.record(tracer)
    if rank == 0:
        mib = args.elements * 8 / 2**20
        print(f"checkpoint: {counted(comm.Get_size(), 'rank')} x {mib:.1f} MiB, "
              f"{counted(count, 'checkpoint')} ({mode}): "
              f"{base_rate:.1f} it/s without, {ckpt_rate:.1f} it/s with "
              f"({(base_rate / ckpt_rate - 1) * 100:+.1f} % time); median write "
              f"{appkit.ms(np.median(writer.log['write_ns']))}, verify "
              f"{appkit.ms(np.median(writer.log['verify_ns']))}; restart from checkpoint "
              f"{c + 1} {'matches' if restarted else 'DIFFERS'}; {'verified' if verified else 'FAILED'}"
              + (f"; files kept in {directory}" if args.keep else ""))
    appkit.verify_all(comm, verified, "a checkpoint did not read back as written, or the restart "
                                      "from it did not reproduce the final state")


if __name__ == "__main__":
    main()
