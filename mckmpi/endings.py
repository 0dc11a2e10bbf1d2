"""How a rank's run ends, in one place: signals, exit statuses and exceptions -> an ending.

An ending is a small dict stored in the run file (see `trace.schema.ENDINGS`): `ending`
(one word), `exit_status`, `signal`, `rank`, `error` (the first error line) and `time_ns`
(rank 0's clock, so the job's first ending can be told).

Signals: SIGTERM (scancel, a time limit: Slurm sends SIGKILL KillWait seconds later), SIGINT
and SIGHUP, plus those named by ``mckmpi run --signal`` (e.g. USR1 for ``sbatch
--signal=USR1@60``), raise `JobSignal` in the main thread, so the app unwinds and the run
file is finished inside that window. Python runs handlers only between bytecodes, so a rank
blocked in C (an MPI call whose peer is gone) would not notice: the C-level handler also
writes the signal number to a wakeup fd, and the trace streamer, woken by it, flushes the
rank's data and records the ending at once.

MPI_Abort called by the app ends the process inside the MPI library, without an exit
handler. The harness loads a wrapper of it (`mckmpi/_mpiabort.c`) as an MPI profiling
library before MPI (`wrap_mpi_abort`); the wrapper calls `mpi_abort_called` first, and the
handler the runner set with `on_mpi_abort` records the ending `aborted` (the errorcode as
`exit_status`, the rank) and the rank's data in its spool.
"""

from __future__ import annotations

import _thread
import importlib.util
import os
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mckmpi.errors import StorageError, UsageError

#: Signals that always end a run with a recorded ending.
ENDING_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: Signals a user may add with --signal.
OPTIONAL_SIGNALS = {"USR1": signal.SIGUSR1, "USR2": signal.SIGUSR2}


class JobSignal(BaseException):
    """A terminating signal arrived: the app unwinds (a BaseException, so an app's
    ``except Exception`` does not swallow it) and the run file is finished."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def parse_signals(text: str) -> tuple[int, ...]:
    """The --signal list (``USR1,USR2``, with or without ``SIG``)."""
    found = []
    for word in filter(None, (w.strip().upper().removeprefix("SIG") for w in text.split(","))):
        if word not in OPTIONAL_SIGNALS:
            raise UsageError(f"--signal {text!r}: choose from {', '.join(OPTIONAL_SIGNALS)}")
        found.append(OPTIONAL_SIGNALS[word])
    return tuple(found)


@dataclass
class SignalCatcher:
    """The handlers of this rank's ending signals and their wakeup fd (read end `wake_fd`)."""

    signals: tuple[int, ...]
    wake_fd: int
    _write_fd: int
    _previous: dict[int, Any]
    caught: int = 0
    pending: BaseException | None = None

    @classmethod
    def install(cls, extra: tuple[int, ...] = ()) -> SignalCatcher:
        """Catch the ending signals (main thread only)."""
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        sigs = tuple(ENDING_SIGNALS) + tuple(s for s in extra if s not in ENDING_SIGNALS)
        catcher = cls(sigs, r, w, {})
        for s in sigs:
            catcher._previous[s] = signal.signal(s, catcher._raise)
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        return catcher

    def _raise(self, signum: int, frame: Any) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            raise pending
        if not self.caught:
            self.caught = signum
            raise JobSignal(signum)

    def interrupt(self, exc: BaseException) -> None:
        """Raise `exc` in the main thread at its next bytecode (called from another thread,
        e.g. the trace streamer when the spool cannot be written)."""
        self.pending = exc
        _thread.interrupt_main(self.signals[0])

    def quiet(self) -> None:
        """After the app: further signals are noted, not raised, so the run file's last
        write is not torn apart by a second SIGTERM (Slurm's SIGKILL ends it if it must)."""
        for s in self.signals:
            signal.signal(s, self._note)

    def _note(self, signum: int, frame: Any) -> None:
        self.caught = self.caught or signum

    def restore(self) -> None:
        signal.set_wakeup_fd(-1)
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        os.close(self._write_fd)
        os.close(self.wake_fd)


def first_line(exc: BaseException) -> str:
    """`Type: message` of an exception, first line only."""
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


def ending(word: str, rank: int, offset_ns: int, exit_status: int = 0, signum: int = 0,
           error: str = "") -> dict[str, Any]:
    """An ending record of `rank`, stamped on rank 0's clock."""
    return {"ending": word, "exit_status": int(exit_status),
            "signal": signal.Signals(signum).name if signum else "", "rank": rank,
            "error": error[:500], "time_ns": time.monotonic_ns() + offset_ns}


def of_signal(signum: int, rank: int, offset_ns: int) -> dict[str, Any]:
    return ending("signal", rank, offset_ns, 128 + signum, signum,
                  f"rank {rank} received {signal.Signals(signum).name}")


def of_exception(exc: BaseException, rank: int, offset_ns: int) -> dict[str, Any]:
    """The ending of whatever left the app: exit status, signal, I/O failure or exception."""
    if isinstance(exc, JobSignal):
        return of_signal(exc.signum, rank, offset_ns)
    if isinstance(exc, SystemExit):
        code = exc.code
        if code is None or code == 0:
            return ending("normal", rank, offset_ns)
        if not isinstance(code, int):
            return ending("exit", rank, offset_ns, 1, error=str(code))
        return ending("exit", rank, offset_ns, code, error=f"rank {rank} exited with status {code}")
    if isinstance(exc, StorageError):
        return ending("io-error", rank, offset_ns, exc.exit_code, error=str(exc))
    return ending("exception", rank, offset_ns, 1, error=first_line(exc))


def of_child(status: int, target: str, rank: int, offset_ns: int) -> dict[str, Any]:
    """The ending of an executable app run as the rank's child (negative: killed by signal)."""
    if status == 0:
        return ending("normal", rank, offset_ns)
    if status < 0:
        return ending("signal", rank, offset_ns, 128 - status, -status,
                      f"rank {rank}: {target} killed by {signal.Signals(-status).name}")
    return ending("exit", rank, offset_ns, status,
                  error=f"rank {rank}: {target} exited with status {status}")


def of_abort(errorcode: int, rank: int, offset_ns: int) -> dict[str, Any]:
    """The ending of a rank whose app called MPI_Abort(comm, `errorcode`)."""
    return ending("aborted", rank, offset_ns, errorcode,
                  error=f"rank {rank} called MPI_Abort with errorcode {errorcode}")


#: What `mpi_abort_called` runs (set by the runner while the app runs), or None.
_abort_handler: Callable[[int], None] | None = None


def on_mpi_abort(handler: Callable[[int], None] | None) -> None:
    """Have `handler(errorcode)` run when the app calls MPI_Abort (None: nothing runs, e.g.
    when the harness itself aborts the job after recording another ending)."""
    global _abort_handler
    _abort_handler = handler


def mpi_abort_called(errorcode: int) -> None:
    """Called by the MPI_Abort wrapper, in the aborting thread, before the abort. Runs the
    handler once; its failure must not stop the abort, so it is only printed."""
    global _abort_handler
    handler, _abort_handler = _abort_handler, None
    if handler is None:
        return
    try:
        handler(errorcode)
    except BaseException:  # noqa: BLE001 - the job ends now whatever happened here
        traceback.print_exc()


def wrap_mpi_abort() -> bool:
    """Load the MPI_Abort wrapper as an MPI profiling library, so that an app's own
    MPI_Abort reaches `mpi_abort_called`; before mpi4py loads MPI (else it is too late:
    False). False too when the wrapper was not built or cannot be loaded: then an abort
    leaves the rank's ending unrecorded (`killed`), as without the wrapper."""
    if "mpi4py.MPI" in sys.modules:
        return False
    spec = importlib.util.find_spec("mckmpi._mpiabort")
    if spec is None or not spec.origin:
        return False
    import mpi4py

    wrapper = Path(spec.origin)
    with warnings.catch_warnings(record=True) as failed:
        warnings.simplefilter("always")
        mpi4py.profile(wrapper.name, path=[str(wrapper.parent)])
    return not failed
