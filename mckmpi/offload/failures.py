"""The proxy's own failures while it serves a rank: logged once per kind, counted.

A serving thread that fails on a call outside the handlers' own error handling (a bug, the
record buffer that cannot grow, an ioctl error nobody expected) still answers the call
(`loop.Emulator._rescue`, `ring_server.ChannelServer._rescue`) and goes on serving; then it
reports here. The first failure of each kind (exception type and the line that raised) is
logged with the rank, the call, the answer given and the traceback; repeats are counted
only, since a bug that hits every call would otherwise write a traceback per call, and the
total is logged when the rank leaves (`summary`). Each failed call also gets a record with
`accounting.FAILED`, so the run file's offload/calls table counts them.
"""

from __future__ import annotations

import threading
import traceback
from collections.abc import Callable


class Failures:
    """The failures of one rank's serving and channel threads (thread-safe)."""

    def __init__(self, rank: int, log: Callable[[str], None]) -> None:
        self.rank = rank
        self.log = log
        self.count = 0
        self._kinds: set[tuple[str, str, int]] = set()
        self._lock = threading.Lock()

    def report(self, call: str, exc: BaseException, answer: str,
               kind: tuple[str, str, int] | None = None) -> None:
        """Count a failure on `call` that was answered with `answer`; log its kind once.
        The kind is the exception's type and the line that raised it, unless given."""
        if kind is None:
            frames = traceback.extract_tb(exc.__traceback__)
            last = frames[-1] if frames else None
            name = type(exc).__name__
            kind = (name, last.filename, last.lineno or 0) if last else (name, "", 0)
        with self._lock:
            self.count += 1
            if kind in self._kinds:
                return
            self._kinds.add(kind)
        trace = "".join(traceback.format_exception(exc)).rstrip()
        self.log(f"rank {self.rank}: the proxy failed on {call} ({type(exc).__name__}: {exc}); "
                 f"answered it with {answer} and serves on (failures of this kind are counted, "
                 f"not logged again):\n{trace}")

    def summary(self) -> str | None:
        """One line for the log when the rank leaves, if any failure was not logged."""
        with self._lock:
            if self.count <= len(self._kinds):
                return None
            return (f"rank {self.rank}: the proxy failed on {self.count} calls in all "
                    f"({len(self._kinds)} kinds, logged above); each was answered")
