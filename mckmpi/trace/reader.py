"""Reading run files: lazy, schema-checked, no MPI.

`open_run(path)` checks the schema name, version and completeness and returns a `Run`
whose datasets are read only when asked for (h5py slices), so a file with 10^8 samples
opens instantly on a laptop. Analysis reads through the helpers below, which bound memory
(`rank_blocks` streams one rank's row in chunk-aligned blocks, `table` slices one rank's
rows) and turn HDF5 read failures of a damaged file into one clear `RunFileError`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mckmpi.errors import UsageError
from mckmpi.trace.schema import PARTIAL_SUFFIX, SCHEMA, SCHEMA_VERSION

#: Elements per block when streaming a rank's row (8 MiB of int64).
BLOCK_ELEMENTS = 1 << 20


class RunFileError(UsageError):
    """A file that is not a readable, complete mckmpi run file."""


def _text(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray) and value.dtype.kind in "OS":
        return [_text(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


@dataclass
class Run:
    """An open run file. Use as a context manager, or call `close()`."""

    path: Path
    file: h5py.File
    _row_offsets: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def attrs(self) -> dict[str, Any]:
        return {k: _text(v) for k, v in self.file.attrs.items()}

    @property
    def provenance(self) -> dict[str, Any]:
        g = self.file.get("provenance")
        return {} if g is None else {k: _text(v) for k, v in g.attrs.items()}

    @property
    def ranks(self) -> np.ndarray:
        """The per-rank table (structured array, one row per rank)."""
        return self.read("ranks")

    def datasets(self) -> list[str]:
        """Every recorded dataset path, in file order."""
        names: list[str] = []
        self.file.visititems(lambda n, obj: names.append(n) if isinstance(obj, h5py.Dataset) else None)
        return names

    def __contains__(self, key: str) -> bool:
        return key in self.file

    def __getitem__(self, key: str) -> h5py.Dataset:
        """A dataset, unread: slice it to load (``run['noise/fwq_ns'][0]``)."""
        try:
            return self.file[key]
        except KeyError:
            raise RunFileError(f"{self.path}: no dataset {key!r}") from None

    def units(self, key: str, field: str = "") -> str:
        attrs = self[key].attrs
        return _text(attrs.get("units" if not field else f"units:{field}", ""))

    @property
    def world_size(self) -> int:
        """Ranks of the job (the root attribute, else the /ranks table)."""
        size = self.file.attrs.get("world_size")
        if size is not None:
            return int(size)
        return int(self.file["ranks"].shape[0]) if "ranks" in self.file else 0

    def group_attrs(self, group: str) -> dict[str, Any]:
        """Attributes of a group (``{}`` when the file has no such group)."""
        g = self.file.get(group)
        return {} if not isinstance(g, h5py.Group) else {k: _text(v) for k, v in g.attrs.items()}

    def members(self, group: str) -> list[str]:
        """Dataset names directly under `group`, sorted (``[]`` when absent)."""
        g = self.file.get(group)
        if not isinstance(g, h5py.Group):
            return []
        return sorted(k for k, v in g.items() if isinstance(v, h5py.Dataset))

    def read(self, key: str, selection: Any = ()) -> np.ndarray:
        """Read (part of) a dataset; a damaged file is a `RunFileError`, not an HDF5 trace."""
        ds = self[key]
        try:
            return ds[selection]
        except (OSError, RuntimeError) as exc:
            raise RunFileError(
                f"{self.path}: cannot read {key!r}, the file is damaged ({exc})") from None

    def rank_blocks(self, key: str, rank: int, block: int = BLOCK_ELEMENTS) -> Iterator[np.ndarray]:
        """Rank `rank`'s row of an [ranks, n] array in consecutive blocks of at most `block`
        elements (rounded to whole chunks), so memory stays bounded for any n."""
        ds = self[key]
        if ds.ndim != 2:
            raise RunFileError(f"{self.path}: {key!r} is {ds.ndim}-D, expected [ranks, samples]")
        if not 0 <= rank < ds.shape[0]:
            raise RunFileError(
                f"{self.path}: {key!r} has no rank {rank} (ranks 0..{ds.shape[0] - 1})")
        n = ds.shape[1]
        step = max(1, block)
        if ds.chunks:
            length = ds.chunks[1]
            step = max(length, step - step % length)
        for a in range(0, n, step):
            yield self.read(key, (rank, slice(a, min(n, a + step))))

    def row_offsets(self, key: str) -> np.ndarray:
        """First row of every rank in a table (len = ranks + 1): tables hold rank 0's rows
        first, so only the rank column is read, once per table."""
        if key not in self._row_offsets:
            ds = self[key]
            if ds.dtype.names is None or "rank" not in ds.dtype.names:
                raise RunFileError(f"{self.path}: {key!r} is not a table with a rank column")
            ranks = self.read(key, "rank") if ds.shape[0] else np.zeros(0, dtype=np.int32)
            if ranks.size and np.any(np.diff(ranks) < 0):
                raise RunFileError(f"{self.path}: rows of {key!r} are not ordered by rank")
            size = max(self.world_size, int(ranks.max()) + 1 if ranks.size else 0)
            self._row_offsets[key] = np.searchsorted(ranks, np.arange(size + 1), side="left")
        return self._row_offsets[key]

    def table(self, key: str, rank: int | None = None) -> np.ndarray:
        """A table's rows: all of them, or only those of `rank` (read by slice)."""
        if rank is None:
            return self.read(key)
        offsets = self.row_offsets(key)
        if not 0 <= rank < len(offsets) - 1:
            return self.read(key, slice(0, 0))
        return self.read(key, slice(int(offsets[rank]), int(offsets[rank + 1])))

    def scalars(self, key: str) -> np.ndarray:
        """A per-rank scalar dataset ([ranks]); fixed-width strings come back as `str`."""
        values = self.read(key)
        if values.dtype.kind == "S":
            return np.array([v.decode(errors="replace") for v in values.tolist()], dtype=object)
        return values

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_run(path: str | Path, allow_incomplete: bool = False) -> Run:
    """Open and check a run file; a clear `RunFileError` for anything that is not one."""
    path = Path(path)
    if path.is_dir():
        raise RunFileError(f"{path} is a directory, not a run file "
                           "(`mckmpi study collect` takes a directory of runs)")
    if not path.is_file():
        raise RunFileError(f"no such run file: {path}")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise RunFileError(f"{path}: not a readable HDF5 file ({exc})") from None
    schema = _text(f.attrs.get("schema"))
    version = _text(f.attrs.get("schema_version"))
    problem = None
    if schema != SCHEMA:
        problem = f"not an mckmpi run file (schema {schema!r})"
    elif not isinstance(version, int) or version > SCHEMA_VERSION:
        problem = (f"written with schema version {version}, newer than this mckmpi reads "
                   f"({SCHEMA_VERSION}): upgrade mckmpi")
    elif version < 1:
        problem = f"schema version {version} is not supported"
    elif not f.attrs.get("complete", False) and not allow_incomplete:
        hint = " (a job stopped while writing it)" if path.name.endswith(PARTIAL_SUFFIX) else ""
        problem = f"incomplete run file{hint}"
    if problem:
        f.close()
        raise RunFileError(f"{path}: {problem}")
    return Run(path, f)
