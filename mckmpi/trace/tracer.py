"""The one tracing API: what the runtime, the proxy's records and every app write through.

A `Tracer` collects, per rank, named data under a group (one group per concern: noise,
offload, memory, scheduler, app). Under the harness, what is recorded reaches the rank's
spool while the app runs (at most about a second later, see `trace.writer.Streamer`), and
the writer lays the data of all ranks out in the run file at the end of the job. Three
kinds cover every trace:

- ``scalar(group, name, value)``: one value per rank          -> dataset [ranks]
- ``array(group, name, values)``: a same-shaped array per rank -> dataset [ranks, ...]
- ``table(group, name, rows)``: any number of records per rank -> one table with a 'rank' column

Samples taken in a long loop are registered before the loop with
``stream(group, name, buffer)``; the app sets ``.filled`` as it goes, and what is filled
streams out, so a job that is killed keeps its samples up to the last flush. A structured
buffer streams as a table (one row per record, e.g. one per MPI call). Series that fill
together (an iteration's compute and communication times) share one `Stream` with
``along=``. Ranks whose streams ended at different lengths (a job stopped early) are
padded in the file; the dataset's ``filled`` attribute then says how many of each rank's
are real. Values that change while the app runs (the runtime's counters) are recorded
again whenever they are sampled; the file keeps the last sample.

Units are attributes; times are int64 nanoseconds. The empty group is the file's root
(the runner's /ranks table). A disabled tracer (an app run without
the harness) accepts the same calls and keeps nothing.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mckmpi.trace.schema import ARRAY, SCALAR, STRING_BYTES, TABLE

#: How long the app's thread waits at a safe point for the flush it let run (a flush that
#: takes longer, e.g. on a stalled file system, goes on without holding the app).
SAFE_POINT_HOLD_S = 5.0


class FlushTurn:
    """A flush taken where the app allows it. In one interpreter the streamer's Python work
    needs the GIL, which the app's thread holds while it measures: a flush that takes it at
    a random moment stops the app in the middle of a sample, for the interpreter's switch
    interval plus the flush. So the streamer asks (`wanted`) and waits briefly; the app's
    thread, at its next safe point (setting a stream's ``filled``: between two
    measurements), lets the flush run and waits for it. The app pays the flush between
    samples, where no measurement sees it."""

    def __init__(self) -> None:
        self.wanted = False
        self._cond = threading.Condition()
        self._given = False
        self._flushes = 0

    def give(self) -> None:
        """At a safe point of the app's thread: let a wanted flush run, and wait for it."""
        with self._cond:
            if not self.wanted:
                return
            self._given = True
            flushes = self._flushes
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._flushes != flushes, SAFE_POINT_HOLD_S)

    def take(self, timeout: float) -> bool:
        """In the streamer: ask for a safe point and wait up to `timeout` for it; whether
        the app gave one (else the flush goes ahead anyway: an app without safe points)."""
        with self._cond:
            self.wanted = True
            return self._cond.wait_for(lambda: self._given, timeout)

    def done(self) -> None:
        """In the streamer, after the flush: the app's thread goes on."""
        with self._cond:
            self.wanted = self._given = False
            self._flushes += 1
            self._cond.notify_all()


class Stream:
    """A preallocated buffer that fills while the app runs: rows [0, filled) are data.
    Setting ``filled`` is the app's safe point for a flush (see `FlushTurn`)."""

    __slots__ = ("data", "_filled", "turn")

    def __init__(self, data: np.ndarray, filled: int = 0, turn: FlushTurn | None = None) -> None:
        self.data = data
        self._filled = filled
        self.turn = turn

    @property
    def filled(self) -> int:
        return self._filled

    @filled.setter
    def filled(self, rows: int) -> None:
        self._filled = rows
        turn = self.turn
        if turn is not None and turn.wanted:
            turn.give()


@dataclass
class Record:
    kind: str
    data: np.ndarray
    units: dict[str, str]
    stream: Stream | None = None

    def current(self) -> np.ndarray:
        """What the record holds now (a stream: its filled rows)."""
        return self.data if self.stream is None else self.data[:self.stream.filled]


@dataclass
class Tracer:
    """Per-rank collection of traced data and job-level attributes."""

    enabled: bool = True
    records: dict[str, Record] = field(default_factory=dict)
    group_attrs: dict[str, dict[str, Any]] = field(default_factory=dict)
    turn: FlushTurn | None = None  # set while a streamer flushes this tracer

    def take_turns(self, turn: FlushTurn | None) -> None:
        """Let every stream, registered or to come, offer `turn` its safe points."""
        self.turn = turn
        for record in self.records.values():
            if record.stream is not None:
                record.stream.turn = turn

    def scalar(self, group: str, name: str, value: Any, units: str = "") -> None:
        """One number (or short string) per rank. Strings become fixed-width bytes, so every
        rank's value has the same dtype whatever its length."""
        if isinstance(value, str):
            data = np.asarray(value.encode()[:STRING_BYTES], dtype=f"S{STRING_BYTES}")
        else:
            data = np.asarray(value)
        self._put(group, name, SCALAR, data, {"": units} if units else {})

    def array(self, group: str, name: str, values: np.ndarray, units: str = "") -> None:
        """An array of the same shape and dtype on every rank (e.g. FWQ samples)."""
        self._put(group, name, ARRAY, np.asarray(values), {"": units} if units else {})

    def table(self, group: str, name: str, rows: np.ndarray, units: dict[str, str] | None = None) -> None:
        """Structured records, any count per rank; `units` maps field name -> unit."""
        rows = np.asarray(rows)
        if rows.dtype.names is None or rows.ndim != 1:
            raise TypeError(f"{group}/{name}: a table needs a 1-D structured array")
        if "rank" in rows.dtype.names:
            raise TypeError(f"{group}/{name}: 'rank' is added by the writer")
        self._put(group, name, TABLE, rows, dict(units or {}))

    def stream(self, group: str, name: str, buffer: np.ndarray,
               units: str | dict[str, str] = "", along: Stream | None = None) -> Stream:
        """Register `buffer` (allocated before the timed loop) as an array that fills row by
        row: set ``.filled`` on the returned `Stream` as rows are complete. A structured
        1-D buffer is a table (`units` maps field -> unit). Every rank streams the same
        dtype and row shape; ranks may stop at different rows. With `along`, the buffer
        fills with that stream (one ``.filled`` for both; same length)."""
        buffer = np.asarray(buffer)
        if buffer.ndim < 1:
            raise TypeError(f"{group}/{name}: a stream needs at least one dimension")
        if along is not None and along.data.shape[0] != buffer.shape[0]:
            raise ValueError(f"{group}/{name}: {buffer.shape[0]} rows cannot fill along a "
                             f"stream of {along.data.shape[0]}")
        if buffer.dtype.names is not None:
            if buffer.ndim != 1 or "rank" in buffer.dtype.names:
                raise TypeError(f"{group}/{name}: a table stream needs a 1-D structured "
                                "buffer without a 'rank' field (the writer adds it)")
            kind, unit_map = TABLE, dict(units) if isinstance(units, dict) else {}
        else:
            kind, unit_map = ARRAY, ({"": units} if units and isinstance(units, str) else {})
        stream = along if along is not None else Stream(buffer, turn=self.turn)
        self._put(group, name, kind, buffer, unit_map, stream)
        return stream

    def attrs(self, group: str, **values: Any) -> None:
        """Job-level attributes of a group (rank 0's values are written)."""
        if self.enabled:
            self.group_attrs.setdefault(group, {}).update(values)

    def _put(self, group: str, name: str, kind: str, data: np.ndarray, units: dict[str, str],
             stream: Stream | None = None) -> None:
        if not self.enabled:
            return
        if not name or "/" in name:
            raise ValueError(f"bad trace name {group!r}/{name!r}")
        self.records[f"{group}/{name}" if group else name] = Record(kind, data, units, stream)
