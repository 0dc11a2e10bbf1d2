"""Offload records: one row per call the proxy handled for a rank.

The proxy appends rows with `struct.pack_into` into a growing byte buffer (a fraction of a
microsecond, no numpy on the hot path); the same bytes viewed with `RECORD_DTYPE` are the
numpy structured array the rank gets back when it detaches and the trace writer stores.
Times are CLOCK_MONOTONIC nanoseconds (the rank's `time.monotonic_ns()` clock): trap_ns when
the proxy received the call, done_ns when it answered.
"""

from __future__ import annotations

import struct

import numpy as np

#: bits of the `how` field
EMULATED = 1    # the proxy executed the call and returned its result
CONTINUED = 2   # the kernel executed it in the rank (result/errno are not known: 0)
ZERO_COPY = 4   # data moved straight through the proxy's mapping of the rank's arena
CHANNEL = 8     # submitted through the asynchronous channel, not trapped
LEFT = 16       # the descriptor left the offload: it got a number below the offload range
NATIVE_TASK = 32  # the caller's process runs natively from this call on (identity changed)
FAILED = 64     # the proxy itself failed on this call (see `failures`); it was answered anyway
#: the bits a continued call keeps
MARKS = LEFT | NATIVE_TASK | FAILED

_LAYOUT = struct.Struct("<qqqqiiiihBx")
_SIZE = _LAYOUT.size
_pack_into = _LAYOUT.pack_into
_HOW_AT = _SIZE - 2  # the how byte (then one pad byte)
RECORD_DTYPE = np.dtype({
    "names": ["trap_ns", "done_ns", "bytes", "result", "rank", "pid", "fd", "errno", "call", "how"],
    "formats": ["<i8", "<i8", "<i8", "<i8", "<i4", "<i4", "<i4", "<i4", "<i2", "u1"],
    "offsets": [0, 8, 16, 24, 32, 36, 40, 44, 48, 50],
    "itemsize": _LAYOUT.size,
})
"""Fields: trap_ns, done_ns; bytes requested (count or iovec total; 0 for path calls);
result (>= 0) or -1 with errno; rank; pid (thread id of the caller); fd the call used or
created (-1 if none); errno; call (syscall number, see `syscalls.name_of`); how (bits)."""


class Records:
    """Append-only record buffer of one rank, written by exactly one thread.

    No lock: a row is packed before the count that exposes it is raised, and growing the
    buffer and copying it out are single operations under the GIL, so a reader on another
    thread always sees whole rows.
    """

    def __init__(self, rank: int, initial: int = 4096) -> None:
        self.rank = rank
        self._buf = bytearray(initial * _LAYOUT.size)
        self._n = 0

    def add(self, trap_ns: int, done_ns: int, nbytes: int, result: int, pid: int, fd: int,
            err: int, call: int, how: int) -> None:
        off = self._n * _SIZE
        if off + _SIZE > len(self._buf):
            self._buf.extend(bytes(len(self._buf)))
        _pack_into(self._buf, off, trap_ns, done_ns, nbytes, result, self.rank, pid, fd, err,
                   call, how)
        self._n += 1

    def mark(self, trap_ns: int, pid: int, bits: int) -> bool:
        """Add `bits` to the `how` of the last row if it is the call `pid` made at
        `trap_ns` (a failure after the call was recorded); False if that row is not last."""
        if not self._n:
            return False
        off = (self._n - 1) * _SIZE
        row = _LAYOUT.unpack_from(self._buf, off)
        if row[0] != trap_ns or row[5] != pid:
            return False
        self._buf[off + _HOW_AT] |= bits
        return True

    def __len__(self) -> int:
        return self._n

    def to_bytes(self) -> bytes:
        n = self._n
        return bytes(self._buf[: n * _SIZE])


def merged(*parts: Records) -> bytes:
    """The rows of several buffers of one rank, in order of trap time."""
    rows = from_bytes(b"".join(p.to_bytes() for p in parts))
    return rows[np.argsort(rows["trap_ns"], kind="stable")].tobytes()


def from_bytes(raw: bytes | bytearray | memoryview) -> np.ndarray:
    """A writable structured array of records from their packed bytes."""
    if len(raw) % _LAYOUT.size:
        raise ValueError(f"record bytes ({len(raw)}) are not a multiple of {_LAYOUT.size}")
    return np.frombuffer(bytearray(raw), dtype=RECORD_DTYPE)
