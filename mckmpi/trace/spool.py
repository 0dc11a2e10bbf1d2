"""The spool: each rank's append-only log of what it recorded, written while the app runs.

A job that is killed never closes its HDF5 file, and an HDF5 file killed while open for
writing may be unreadable. So the data that streams during the run goes to plain files that
only ever grow: one per rank, ``NAME.h5.partial.d/rank-NNNNNN.spool``, a sequence of frames

    b"MCKS" | u32 header length | u64 payload length | JSON header | payload bytes

A frame is whole or it is ignored: a kill in the middle of a write leaves a short last frame
that the reader drops, and everything before it stays readable. Frames say which record
they extend (`key`, `kind`, `dtype`, `units`), where (`start` row, `length` rows after
applying it) and carry the raw rows; an ``ending`` frame records how the rank ended; an
``attrs`` frame the group attributes recorded so far.

Beside each spool, ``rank-NNNNNN.ending`` is a small file allocated when the spool is
created (`ENDING_RESERVE` bytes): when the spool cannot take the ending frame any more (a
full disk, the very failure to record), the frame is written there, in place, without
allocating anything. It is written only after the spool failed, so its ending is the later.

This module is pure (no MPI): the writer's streamer appends, the reader replays.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"MCKS"
_HEAD = struct.Struct("<4sIQ")
SPOOL_DIR_SUFFIX = ".d"
#: Bytes allocated for a rank's ending beside its spool (an ending frame is well below).
ENDING_RESERVE = 4096


def spool_dir(partial: Path) -> Path:
    """The directory of the per-rank spools beside ``NAME.h5.partial``."""
    return partial.with_name(partial.name + SPOOL_DIR_SUFFIX)


def spool_path(directory: Path, rank: int) -> Path:
    return directory / f"rank-{rank:06d}.spool"


def reserve_path(spool: Path) -> Path:
    """The ending reserved beside `spool` (``rank-N.ending``)."""
    return spool.with_suffix(".ending")


def _dtype_descr(dtype: np.dtype) -> Any:
    return dtype.descr if dtype.names else dtype.str


def _dtype_of(descr: Any) -> np.dtype:
    return np.dtype(descr if isinstance(descr, str) else [tuple(f) for f in descr])


def plain(value: Any) -> Any:
    """A JSON-able form of an attribute value (numpy scalars and arrays become lists)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _frame_head(header: dict[str, Any], nbytes: int) -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    return _HEAD.pack(MAGIC, len(head), nbytes) + head


class SpoolWriter:
    """Appends frames to one rank's spool. Each frame is one `os.write` of whole bytes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        self.bytes = 0
        try:
            self.reserve_fd = os.open(reserve_path(path),
                                      os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError:
            os.close(self.fd)
            raise
        try:
            os.posix_fallocate(self.reserve_fd, 0, ENDING_RESERVE)
        except OSError:
            self.close()
            raise

    def frame(self, header: dict[str, Any], payload: memoryview | bytes = b"") -> int:
        """Append one frame; raises the OSError of a failed write (ENOSPC, EIO, EDQUOT)."""
        data = memoryview(payload).cast("B")
        written = _write_all(self.fd, _frame_head(header, data.nbytes)) + _write_all(self.fd, data)
        self.bytes += written
        return written

    def reserved_ending(self, ending: dict[str, Any]) -> None:
        """Write the ending frame into the space reserved for it (after the spool failed)."""
        frame = _frame_head({"type": "ending", **ending}, 0)
        if len(frame) > ENDING_RESERVE:
            frame = _frame_head({"type": "ending", **ending, "error": ""}, 0)
        os.pwrite(self.reserve_fd, frame, 0)

    def data(self, key: str, kind: str, rows: np.ndarray, start: int, length: int,
             units: dict[str, str], stream: bool) -> int:
        """Rows [start, start + len(rows)) of record `key`, whose length is then `length`."""
        zero_d = rows.ndim == 0
        rows = np.ascontiguousarray(rows.reshape(1) if zero_d else rows)
        header = {"type": "data", "key": key, "kind": kind, "dtype": _dtype_descr(rows.dtype),
                  "inner": list(rows.shape[1:]), "start": start, "length": length,
                  "units": units, "stream": stream, "zero_d": zero_d}
        return self.frame(header, rows.view(np.uint8).reshape(-1).data if rows.size else b"")

    def close(self) -> None:
        for name in ("fd", "reserve_fd"):
            if getattr(self, name) >= 0:
                os.close(getattr(self, name))
                setattr(self, name, -1)


def _write_all(fd: int, data: bytes | memoryview) -> int:
    view = memoryview(data).cast("B")
    done = 0
    while done < view.nbytes:
        done += os.write(fd, view[done:])
    return done


@dataclass
class RankSpool:
    """What one rank's spool holds, replayed: its records, group attributes and ending."""

    records: dict[str, tuple[str, np.ndarray, dict[str, str], bool]] = field(default_factory=dict)
    attrs: dict[str, dict[str, Any]] = field(default_factory=dict)
    ending: dict[str, Any] | None = None
    torn: bool = False  # the last frame was cut short (the rank died while writing it)


def read_spool(path: Path) -> RankSpool:
    """Replay a rank's spool as far as it is whole."""
    out = RankSpool()
    parts: dict[str, list] = {}
    raw = path.read_bytes()
    pos = 0
    while pos < len(raw):
        if len(raw) - pos < _HEAD.size:
            out.torn = True
            break
        magic, hlen, plen = _HEAD.unpack_from(raw, pos)
        end = pos + _HEAD.size + hlen + plen
        if magic != MAGIC or end > len(raw):
            out.torn = True
            break
        header = json.loads(raw[pos + _HEAD.size:pos + _HEAD.size + hlen])
        payload = raw[pos + _HEAD.size + hlen:end]
        pos = end
        if header["type"] == "ending":
            out.ending = {k: v for k, v in header.items() if k != "type"}
        elif header["type"] == "attrs":
            for group, values in header["groups"].items():
                out.attrs.setdefault(group, {}).update(values)
        elif header["type"] == "data":
            _apply(parts, header, payload)
    for key, entry in parts.items():
        out.records[key] = (entry[0], _assemble(entry), entry[2], entry[3])
    reserve = reserve_path(path)
    if reserve.is_file():  # absent in spools of mckmpi before it
        raw = reserve.read_bytes()[:ENDING_RESERVE]
        if len(raw) >= _HEAD.size:
            magic, hlen, plen = _HEAD.unpack_from(raw, 0)
            if magic == MAGIC and plen == 0 and _HEAD.size + hlen <= len(raw):
                header = json.loads(raw[_HEAD.size:_HEAD.size + hlen])
                if header.get("type") == "ending":
                    out.ending = {k: v for k, v in header.items() if k != "type"}
    return out


def _apply(parts: dict[str, list], header: dict[str, Any], payload: bytes) -> None:
    """Collect one frame's rows; `_assemble` lays them out once, so replay stays linear."""
    dtype = _dtype_of(header["dtype"])
    inner = tuple(header["inner"])
    rows = np.frombuffer(payload, dtype=dtype).reshape((-1,) + inner)
    key = header["key"]
    entry = parts.get(key)
    if entry is None or entry[4] != (dtype, inner) or header["start"] == 0:
        # A record recorded again from its first row replaces what came before.
        entry = [header["kind"], [], header["units"], header["stream"], (dtype, inner),
                 header.get("zero_d", False), 0]
        parts[key] = entry
    entry[1].append((header["start"], rows))
    entry[6] = header["length"]


def _assemble(entry: list) -> np.ndarray:
    _, pieces, _, _, (dtype, inner), zero_d, length = entry
    data = np.zeros((length,) + inner, dtype=dtype)
    for start, rows in pieces:
        data[start:start + rows.shape[0]] = rows[:max(0, length - start)]
    return data[0] if zero_d and length == 1 else data
