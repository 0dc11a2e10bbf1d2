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
"""

from __future__ import annotations

import _thread
import os
import signal
import time
import traceback
from dataclasses import dataclass
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
