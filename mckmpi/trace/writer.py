"""Writing one run file per job from the tracers of all ranks, streaming while the app runs.

A run file lives in three steps (`RunFile`):

1. **start** (collective): rank 0 reserves ``NAME.h5.partial`` (O_EXCL; ``NAME.h5`` must not
   exist either) and writes its header (schema, ``complete = False``, the job's attributes,
   provenance, the /ranks table) with plain HDF5, then closes it: the header is never open
   for writing again, so no kill can damage it. Every rank opens its spool
   (``NAME.h5.partial.d/rank-N.spool``, see `trace.spool`).
2. **stream**: each rank's `Streamer` thread appends what the tracer holds to the spool,
   at most `flush_s` seconds (or `MAX_BEHIND` bytes) behind, and at once when a signal
   arrives. A job killed now leaves the header and the spools, which the reader replays.
3. **finish** (collective): the final file is written inside the spool directory, laid out
   for the whole job (parallel HDF5 or gathered to rank 0), marked ``complete = True``,
   closed and renamed to ``NAME.h5`` without replacing anything; the header and the spools
   are removed after. If the rename fails, the file is marked incomplete again and the
   header with its spools stays what readers see.

Layout: every rank first shares a small manifest of what it recorded (names, kinds, dtypes,
shapes); from the merged manifest all ranks derive the same layout, which is what parallel
HDF5 needs: every rank creates the same datasets in the same order (`create_dataset`, the
one place datasets are made), then writes only its own slice. Streams that ended at
different lengths are padded to the longest, with a ``filled`` attribute.

I/O errors are collective decisions: before every collective HDF5 step the ranks agree
(one allgather) that everyone can go on; otherwise every rank raises the same
`StorageError` naming the first failing path and its errno, and the header and spools stay
readable.

Memory stays bounded for large traces (10^8 samples): arrays are chunked one rank per chunk
row, so a rank's data is written (and later read) without touching other ranks' chunks;
data is written in blocks of at most `WRITE_BLOCK` bytes; the single writer receives one
rank's records at a time instead of gathering the whole job into rank 0.
"""

from __future__ import annotations

import contextlib
import errno as errnos
import os
import select
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from mckmpi.errors import StorageError
from mckmpi.linux import rename_noreplace
from mckmpi.trace.layout import (
    Layout,
    current,
    manifest,
    merge,
    write_attrs,
    write_header,
    write_records,
)
from mckmpi.trace.schema import PARTIAL_SUFFIX, job_ending
from mckmpi.trace.spool import SpoolWriter, plain, reserve_path, spool_dir, spool_path
from mckmpi.trace.tracer import FlushTurn, Record, Tracer

if TYPE_CHECKING:
    from mpi4py import MPI

#: Message tag of the single writer's rank-by-rank collection.
GATHER_TAG = 0x6D636C
#: Default and bound of how far the spool may lag behind what was recorded.
FLUSH_S = 1.0
#: How long a due flush waits for a safe point of the app (`tracer.FlushTurn`) before it
#: goes ahead anyway; taken out of the interval, so a flush is still at most FLUSH_S late.
SAFE_POINT_WAIT_S = 0.1
MAX_BEHIND = 64 << 20
#: Name of the final file while it is written, inside the spool directory.
FINAL_NAME = "final.h5"
#: Parallel files whose close failed even after truncation (kept from the collector).
_UNCLOSABLE: list[h5py.File] = []


# --- errors as collective decisions --------------------------------------------------------


def describe(exc: BaseException, path: Path) -> tuple[int, str]:
    """(errno, one line) of a failed I/O step on `path`. HDF5 reports most failures without
    the errno ("file write failed"), so then the directory is probed with a small write of
    its own, which meets the same condition (full, over quota, failing device)."""
    code = getattr(exc, "errno", None) or 0
    if not code:
        text = str(exc)
        for candidate in (errnos.ENOSPC, errnos.EDQUOT, errnos.EIO, errnos.EROFS,
                          errnos.EACCES, errnos.EEXIST):
            if f"errno = {candidate}," in text:
                code = candidate
                break
        else:
            code = _probe(path.parent)
    reason = os.strerror(code) if code else str(exc).splitlines()[0]
    name = errnos.errorcode.get(code, "")
    return code, f"cannot write {path}: {name + ' ' if name else ''}({reason})"


def _probe(directory: Path) -> int:
    """The errno a 64 KiB write in `directory` meets now (0 if it succeeds)."""
    probe = directory / f".mckmpi-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        return exc.errno or 0
    try:
        os.write(fd, bytes(64 << 10))
        os.fsync(fd)
        return 0
    except OSError as exc:
        return exc.errno or 0
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)


def agree(comm: MPI.Intracomm, failure: tuple[int, str] | None) -> None:
    """One allgather: every rank learns whether any failed, and all raise the first failure
    together, so no rank enters a collective step the others have left."""
    failures = [f for f in comm.allgather(failure) if f is not None]
    if failures:
        code, line = failures[0]
        raise StorageError(line, code)


def _attempt(path: Path, step: Any, *args: Any) -> tuple[int, str] | None:
    """Run one local I/O step; its failure as (errno, line) instead of an exception."""
    try:
        step(*args)
    except (OSError, RuntimeError, ValueError) as exc:  # how h5py reports HDF5 I/O failures
        return describe(exc, path)
    return None


# --- the streamer ---------------------------------------------------------------------------


@dataclass
class Streamer:
    """A thread that appends what the tracer holds to this rank's spool: every `flush_s`
    seconds (sooner when the last flush moved more than `MAX_BEHIND` bytes), at once when a
    byte arrives on `wake_fd` (the signal wakeup fd: the byte is the signal number), and a
    last time on `stop`. A failed write stops streaming and is kept in `error`."""

    tracer: Tracer
    spool: SpoolWriter
    flush_s: float = FLUSH_S
    wake_fd: int = -1
    on_signal: Any = None  # called with the signal number after its flush
    on_error: Any = None  # called (in the thread) with the OSError of a failed flush
    error: OSError | None = None
    #: Called before each flush to record running state (e.g. the offload calls so far);
    #: one that fails is dropped, its error recorded as attribute `source_error` of /trace.
    sources: list[Any] = field(default_factory=list)
    sent: dict[str, tuple[Record, int]] = field(default_factory=dict)
    attrs_sent: str = ""
    _stop: threading.Event = field(default_factory=threading.Event)
    _turn: FlushTurn = field(default_factory=FlushTurn)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop_fds: tuple[int, int] = (-1, -1)

    def start(self) -> None:
        self._stop_fds = os.pipe2(os.O_CLOEXEC)
        self.tracer.take_turns(self._turn)
        self._thread = threading.Thread(target=self._loop, name="mckmpi-trace-streamer",
                                        daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        wait = self.flush_s
        while True:
            signum = self._sleep(max(wait - SAFE_POINT_WAIT_S, 0.0))
            if self._stop.is_set():
                return
            try:
                if not signum:  # a signal's flush does not wait for the app
                    self._turn.take(SAFE_POINT_WAIT_S)
                moved = self.flush()
            finally:
                self._turn.done()
            wait = self.flush_s if moved <= MAX_BEHIND else self.flush_s * MAX_BEHIND / moved
            if signum and self.on_signal is not None:
                self.on_signal(signum)
            if self.error is not None:
                if self.on_error is not None:
                    self.on_error(self.error)
                return

    def _sleep(self, seconds: float) -> int:
        """Sleep until the interval is over, `stop` or a signal; the signal's number."""
        fds = [self._stop_fds[0]] + ([self.wake_fd] if self.wake_fd >= 0 else [])
        ready, _, _ = select.select(fds, [], [], seconds)
        if self.wake_fd not in ready:
            return 0
        try:
            data = os.read(self.wake_fd, 64)
        except BlockingIOError:
            return 0
        return data[-1] if data else 0

    def flush(self) -> int:
        """Append what changed since the last flush; bytes written (0 after a failure)."""
        for source in list(self.sources):
            try:
                source()
            except Exception as exc:  # a source's own failure must not stop the streaming
                self.sources.remove(source)
                self.tracer.attrs("trace", source_error=f"{type(exc).__name__}: {exc}")
        with self._lock:
            if self.error is not None or self.spool.fd < 0:
                return 0
            try:
                return self._flush()
            except OSError as exc:
                self.error = exc
                return 0

    def _flush(self) -> int:
        moved = 0
        for key, rec in list(self.tracer.records.items()):
            data = rec.current()
            zero_d = data.ndim == 0
            n = 1 if zero_d else data.shape[0]
            last = self.sent.get(key)
            if last is not None and last[0] is rec and last[1] == n:
                continue
            if last is not None and _unchanged(last[0], rec):
                self.sent[key] = (rec, n)  # a counter sampled again without a change
                continue
            start = last[1] if last is not None and last[0] is rec and rec.stream is not None \
                and last[1] <= n else 0
            rows = data if zero_d else data[start:n]
            moved += self.spool.data(key, rec.kind, rows, start if not zero_d else 0, n,
                                     rec.units, rec.stream is not None)
            self.sent[key] = (rec, n)
        attrs = {g: {k: plain(v) for k, v in values.items()}
                 for g, values in list(self.tracer.group_attrs.items())}
        text = repr(sorted((g, sorted(v.items())) for g, v in attrs.items()))
        if text != self.attrs_sent:
            moved += self.spool.frame({"type": "attrs", "groups": attrs})
            self.attrs_sent = text
        return moved

    def ending(self, ending: dict[str, Any]) -> None:
        """Record how this rank ended (the last ending frame counts); once the spool failed
        (a full disk), in the space reserved for it."""
        with self._lock:
            if self.spool.fd < 0:
                return
            if self.error is None:
                try:
                    self.spool.frame({"type": "ending", **ending})
                    return
                except OSError as exc:
                    self.error = exc
            try:
                self.spool.reserved_ending(ending)
            except OSError:
                pass  # the reserve failed too (a failing device): the rank reads as killed

    def stop(self) -> None:
        """Stop the thread and flush what is left; the spool stays open for the ending."""
        self._stop.set()
        if self._thread is not None:
            os.write(self._stop_fds[1], b"x")
            self._thread.join()
            self._thread = None
            self.tracer.take_turns(None)
            for fd in self._stop_fds:
                os.close(fd)
        self.flush()

    def close(self) -> None:
        with self._lock:
            self.spool.close()


#: Records re-recorded with the same bytes up to this size are not spooled again.
_COMPARED_BYTES = 4096


def _unchanged(before: Record, now: Record) -> bool:
    """Whether a record recorded again (a sampled counter) holds what was spooled."""
    if before.stream is not None or now.stream is not None or before.kind != now.kind:
        return False
    a, b = before.data, now.data
    return (a.dtype == b.dtype and a.shape == b.shape and b.nbytes <= _COMPARED_BYTES
            and a.tobytes() == b.tobytes())


# --- the run file's life --------------------------------------------------------------------


def reserve_name(path: Path) -> Path:
    """Create ``path.partial`` exclusively (neither it nor `path` may exist): the name is
    this job's from now on. Returns the partial path; FileExistsError when taken."""
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    if path.exists():
        raise FileExistsError(errnos.EEXIST, "exists", str(path))
    os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    return partial


@dataclass
class RunFile:
    """One job's run file from start to finish (see the module docstring)."""

    comm: Any
    path: Path
    partial: Path
    root_attrs: dict[str, Any]
    provenance: dict[str, Any]
    method: str
    streamer: Streamer | None = None
    ended: bool = False  # this rank's ending was given to `finish` or `abandon`

    @property
    def spool(self) -> Path:
        return spool_dir(self.partial)

    @classmethod
    def start(cls, comm: MPI.Intracomm, path: Path, tracer: Tracer, root_attrs: dict[str, Any],
              provenance: dict[str, Any], method: str = "auto", flush_s: float = FLUSH_S,
              wake_fd: int = -1, on_signal: Any = None, on_error: Any = None,
              reserved: bool = False) -> RunFile:
        """Reserve the name, write the header and open the spools (collective). `reserved`:
        rank 0 already created ``path.partial`` with `reserve_name`."""
        rank = comm.Get_rank()
        _writer_kind(method)
        root_attrs, provenance = comm.bcast((root_attrs, provenance) if rank == 0 else None,
                                            root=0)
        partial = path.with_name(path.name + PARTIAL_SUFFIX)
        run = cls(comm, path, partial, root_attrs, provenance, method)
        # The header holds the root group's records (the runner's /ranks table); the rest
        # streams to the spools and is laid out at the end.
        header = {k: r for k, r in tracer.records.items() if "/" not in k}
        layouts = merge(comm.allgather(manifest(header)))
        records = comm.gather(current(header), root=0)
        failure = None
        if rank == 0:
            failure = _attempt(partial, run._write_header_file, layouts, records,
                               tracer.group_attrs, reserved)
        agree(comm, failure)
        if flush_s > 0:
            target = spool_path(run.spool, rank)
            holder: list[SpoolWriter] = []
            agree(comm, _attempt(target, lambda: holder.append(SpoolWriter(target))))
            run.streamer = Streamer(tracer, holder[0], flush_s, wake_fd, on_signal, on_error)
            run.streamer.start()
        return run

    def _write_header_file(self, layouts: list[Layout], records: list[dict[str, np.ndarray]],
                           group_attrs: dict[str, dict[str, Any]], reserved: bool) -> None:
        if not reserved:
            reserve_name(self.path)
        os.mkdir(self.spool)
        with h5py.File(self.partial, "w") as f:
            datasets = write_header(f, layouts, self.root_attrs, self.provenance, group_attrs,
                                    compress=True)
            for r, data in enumerate(records):
                write_records(layouts, datasets, r, data)

    def finish(self, tracer: Tracer, ending: dict[str, Any]) -> Path:
        """Record this rank's `ending`, write the final file and rename it (collective).
        Returns the final path; raises `StorageError` on every rank when it cannot."""
        comm, rank, size = self.comm, self.comm.Get_rank(), self.comm.Get_size()
        self.ended = True
        failure = None
        if self.streamer is not None:
            self.streamer.stop()
            self.streamer.ending(ending)
            self.streamer.close()
            if self.streamer.error is not None:
                failure = describe(self.streamer.error, self.streamer.spool.path)
        endings = comm.allgather(ending)
        layouts = merge(comm.allgather(manifest(tracer.records)))
        root = {**self.root_attrs, **job_ending(endings)}
        group_attrs = comm.bcast(tracer.group_attrs if rank == 0 else None, root=0)
        agree(comm, failure)
        final = self.spool / FINAL_NAME
        records = current(tracer.records)
        if _writer_kind(self.method) == "parallel":
            self._write_parallel(final, layouts, root, group_attrs, records)
        else:
            self._write_gathered(final, layouts, root, group_attrs, records, size)
        failure = None
        if rank == 0:
            failure = _attempt(self.path, self._publish, final)
        agree(comm, failure)
        return self.path

    def _write_parallel(self, final: Path, layouts: list[Layout], root: dict[str, Any],
                        group_attrs: dict[str, dict[str, Any]], records: dict[str, np.ndarray]
                        ) -> None:
        comm, rank = self.comm, self.comm.Get_rank()
        holder: list[h5py.File] = []
        agree(comm, _attempt(final, lambda: holder.append(
            h5py.File(final, "w", driver="mpio", comm=comm))))
        f = holder[0]
        try:
            datasets: list[h5py.Dataset] = []
            agree(comm, _attempt(final, lambda: datasets.extend(
                write_header(f, layouts, root, self.provenance, group_attrs, compress=False))))
            agree(comm, _attempt(final, write_records, layouts, datasets, rank, records))
            agree(comm, _attempt(final, f.flush))
            agree(comm, _attempt(final, write_attrs, f, {"complete": True}))
            datasets.clear()  # no dataset left open when the file closes
            agree(comm, _attempt(final, f.close))
        except StorageError:
            self._discard(f, final)
            raise

    def _discard(self, f: h5py.File, final: Path) -> None:
        """`_drop` for a parallel file: truncated by rank 0, closed by all (collective)."""
        comm = self.comm
        if not f.id.valid:
            return
        if comm.Get_rank() == 0:
            _attempt(final, os.truncate, final, 0)
        comm.Barrier()
        _drop(f, final, truncate=False)

    def _write_gathered(self, final: Path, layouts: list[Layout], root: dict[str, Any],
                        group_attrs: dict[str, dict[str, Any]], records: dict[str, np.ndarray],
                        size: int) -> None:
        comm, rank = self.comm, self.comm.Get_rank()
        failure = None
        if rank == 0:
            failure = _attempt(final, self._gather_into, final, layouts, root, group_attrs,
                               records, size)
        else:
            # Rank 0 asks for each rank's records in turn, or says it stopped (False).
            if comm.recv(source=0, tag=GATHER_TAG):
                comm.send(records, dest=0, tag=GATHER_TAG)
        agree(comm, failure)

    def _gather_into(self, final: Path, layouts: list[Layout], root: dict[str, Any],
                     group_attrs: dict[str, dict[str, Any]], records: dict[str, np.ndarray],
                     size: int) -> None:
        comm, asked = self.comm, 1
        f = h5py.File(final, "w")
        try:
            datasets = write_header(f, layouts, root, self.provenance, group_attrs,
                                    compress=True)
            write_records(layouts, datasets, 0, records)
            for peer in range(1, size):
                # One rank's records in memory at a time: ask, receive, write, drop.
                comm.send(True, dest=peer, tag=GATHER_TAG)
                asked = peer + 1
                received = comm.recv(source=peer, tag=GATHER_TAG)
                write_records(layouts, datasets, peer, received)
            f.flush()
            write_attrs(f, {"complete": True})
            del datasets
            f.close()
        except BaseException:
            _drop(f, final)
            raise
        finally:
            for rest in range(asked, size):
                comm.send(False, dest=rest, tag=GATHER_TAG)

    def _publish(self, final: Path) -> None:
        """Rename the complete file to its name, never replacing one; on failure it is
        marked incomplete again, and the header and spools remain the record."""
        try:
            rename_noreplace(final, self.path)
        except OSError:
            with h5py.File(final, "r+") as f:
                write_attrs(f, {"complete": False})
            raise
        self.partial.unlink()
        shutil.rmtree(self.spool, ignore_errors=True)

    def add_source(self, source: Any) -> None:
        """Have `source()` record running state before every flush (in the streamer's
        thread; it must be safe to call while the app runs)."""
        if self.streamer is not None:
            self.streamer.sources.append(source)

    def abandon(self, ending: dict[str, Any]) -> None:
        """This rank cannot take part in `finish` (the job is aborting): record its ending
        and what it holds in its spool, so the partial file tells what happened."""
        self.ended = True
        if self.streamer is not None:
            self.streamer.stop()
            self.streamer.ending(ending)
            self.streamer.close()


    def discard(self) -> None:
        """The job was refused before its app started, by a check only a rank's set-up could
        make (the LWK boot, the offload filter): nothing was recorded, so this rank's spool
        goes, and on rank 0 the header and the spool directory: a run that never ran leaves
        no file. A rank whose ending was already recorded keeps it."""
        if self.ended:
            return
        self.ended = True
        with contextlib.suppress(OSError):
            if self.streamer is not None:
                self.streamer.stop()
                self.streamer.close()
                path = self.streamer.spool.path
                path.unlink(missing_ok=True)
                reserve_path(path).unlink(missing_ok=True)
            if self.comm.Get_rank() == 0:
                shutil.rmtree(self.spool, ignore_errors=True)
                self.partial.unlink(missing_ok=True)


def _drop(f: h5py.File, final: Path, truncate: bool = True) -> None:
    """Close and delete a final file that failed. Its close flushes metadata, which fails
    again on a full disk, and an HDF5 file left open crashes the process at exit: so the
    file, dropped anyway, is first truncated to give its space back."""
    if f.id.valid:
        if truncate:
            _attempt(final, os.truncate, final, 0)
        if _attempt(final, f.close) is not None:
            _UNCLOSABLE.append(f)  # never collected: its close would crash the process
    final.unlink(missing_ok=True)


def _writer_kind(method: str) -> str:
    if method == "parallel" and not parallel_available():
        raise RuntimeError("trace_writer=parallel, but h5py was built without MPI")
    return "parallel" if method == "parallel" or (method == "auto" and parallel_available()) \
        else "gather"


def parallel_available() -> bool:
    return bool(h5py.get_config().mpi)


def write_run(
    comm: MPI.Intracomm,
    path: Path,
    tracer: Tracer,
    root_attrs: dict[str, Any],
    provenance: dict[str, Any],
    method: str = "auto",
) -> Path:
    """Write the job's run file at `path` in one go (collective; no streaming); returns the
    final path."""
    run = RunFile.start(comm, path, tracer, root_attrs, provenance, method, flush_s=0)
    return run.finish(tracer, normal_ending(comm.Get_rank()))


def write_assembled(path: Path, tracers: list[Tracer], root_attrs: dict[str, Any],
                    provenance: dict[str, Any], endings: list[dict[str, Any] | None]) -> Path:
    """One process writes a job's run file from every rank's records (`tracers[r]` is rank
    r's; group attributes are rank 0's), as the gathered writer would lay it out: the ranks
    of an MPI executable never initialise MPI, so rank 0 assembles what they left. The name
    is reserved exclusively and the file renamed complete, never replacing one."""
    partial = reserve_name(path)
    layouts = merge([manifest(t.records) for t in tracers])
    root = {**root_attrs, **job_ending(endings)}
    try:
        with h5py.File(partial, "w") as f:
            datasets = write_header(f, layouts, root, provenance, tracers[0].group_attrs,
                                    compress=True)
            for rank, tracer in enumerate(tracers):
                write_records(layouts, datasets, rank, current(tracer.records))
            write_attrs(f, {"complete": True})
            del datasets
        rename_noreplace(partial, path)
    except OSError as exc:
        raise StorageError(describe(exc, path)[1], exc.errno or 0) from None
    return path


def normal_ending(rank: int) -> dict[str, Any]:
    return {"ending": "normal", "exit_status": 0, "signal": "", "rank": rank, "error": "",
            "time_ns": time.monotonic_ns()}
