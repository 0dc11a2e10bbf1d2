"""Reading run files: lazy, schema-checked, no MPI.

`open_run(path)` checks the schema name, version and completeness and returns a `Run`
whose datasets are read only when asked for (h5py slices), so a file with 10^8 samples
opens instantly on a laptop.

A file is complete only when its `complete` attribute says so *and* its name is final (not
``*.partial``). With ``allow_incomplete``, a partial file (``NAME.h5.partial``: the job did
not finish) is recovered: its header plus the ranks' spools replayed as far as each is
whole, laid out as the writer would have (in memory), with `Run.partial` set and
`Run.note` saying in one line how the job ended and what is missing. Analysis reads through the helpers below, which bound memory
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
from mckmpi.trace.labels import columns, is_flags, is_scale, unlabel
from mckmpi.trace.layout import merge, write_header, write_records
from mckmpi.trace.schema import (
    OLDEST_SCHEMA_VERSION,
    ATTR_TYPES,
    BOOL_ATTRS,
    DATASET_ATTR_TYPES,
    DATASET_LAYOUTS,
    MAX_RANKS,
    PARTIAL_SUFFIX,
    SCHEMA,
    SCHEMA_VERSION,
    job_ending,
)
from mckmpi.trace.spool import read_spool, spool_dir, spool_path

#: Elements per block when streaming a rank's row (8 MiB of int64).
BLOCK_ELEMENTS = 1 << 20


class RunFileError(UsageError):
    """A file that is not a readable, complete mckmpi run file."""


class Flags:
    """Booleans stored as CF flags (int8 0/1, schema version 3), read as `bool` as the HDF5
    enums of older versions are: the h5py.Dataset interface the readers use."""

    def __init__(self, ds: h5py.Dataset) -> None:
        self.ds, self.name, self.shape, self.ndim = ds, ds.name, ds.shape, ds.ndim
        self.dtype, self.chunks, self.dims = np.dtype(bool), ds.chunks, ds.dims
        self.attrs = {k: v for k, v in ds.attrs.items()
                      if k not in ("flag_values", "flag_meanings", "DIMENSION_LIST")}

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, selection: Any) -> Any:
        return np.asarray(self.ds[selection]).astype(bool)[()]


class Fields:
    """A record stored one dataset per field (schema version 3: netCDF tools cannot show
    HDF5 compound datasets), read as the compound dataset older versions hold: the same
    structured dtype, shape, slicing (by index or by field name) and attributes (the
    group's, with ``units:FIELD`` from each field's ``units``)."""

    def __init__(self, path: Path, group: h5py.Group, names: list[str]) -> None:
        stored = {}
        for name in names:
            ds = group.get(name)
            if not isinstance(ds, h5py.Dataset):
                raise RunFileError(f"{path}: table {group.name.lstrip('/')!r} lacks its "
                                   f"column {name!r}")
            stored[name] = Flags(ds) if is_flags(ds) else ds
        shapes = {ds.shape for ds in stored.values()}
        if len(shapes) != 1:
            raise RunFileError(f"{path}: the columns of {group.name.lstrip('/')!r} differ in "
                               f"length ({sorted(shapes)})")
        first = next(iter(stored.values()))
        self.columns, self.name, self.shape = stored, group.name, shapes.pop()
        self.ndim, self.chunks, self.dims = len(self.shape), first.chunks, first.dims
        self.dtype = np.dtype([(n, ds.dtype) for n, ds in stored.items()])
        self.attrs: dict[str, Any] = {k: v for k, v in group.attrs.items() if k != "columns"}
        for name, ds in stored.items():
            unit = ds.attrs.get("units")
            if unit is not None:
                self.attrs[f"units:{name}"] = unit

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d table")
        return self.shape[0]

    def __getitem__(self, selection: Any) -> Any:
        if isinstance(selection, str):
            if selection not in self.columns:
                raise ValueError(f"no field {selection!r}")
            return self.columns[selection][()]
        parts = {n: np.asarray(ds[selection]) for n, ds in self.columns.items()}
        out = np.empty(next(iter(parts.values())).shape, dtype=self.dtype)
        for name, values in parts.items():
            out[name] = values
        return out[()] if out.ndim == 0 else out


#: What `Run[key]` gives: the dataset, or a view that reads a version 3 layout as older ones.
Recorded = h5py.Dataset | Flags | Fields


def as_recorded(path: Path, key: str, obj: object) -> Recorded:
    """File object `obj` (at `key` of file `path`) as recorded data, whatever the layout:
    a dataset, booleans stored as flags, or a table stored one dataset per column."""
    if isinstance(obj, h5py.Group):
        names = columns(obj)
        if names is None:
            raise RunFileError(f"{path}: {key!r} is a group, not a dataset")
        return Fields(path, obj, names)
    if not isinstance(obj, h5py.Dataset):
        raise RunFileError(f"{path}: {key!r} is not a dataset")
    return Flags(obj) if is_flags(obj) else obj


def _text(value: Any) -> Any:
    """An attribute as plain Python: str for bytes, lists for arrays, int/float/bool for
    numpy scalars (whatever the file holds: bytes that are not UTF-8 are replaced)."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, str):  # h5py hands bytes that are not UTF-8 over as surrogates
        return value.encode(errors="surrogateescape").decode(errors="replace")
    if isinstance(value, np.ndarray):
        return [_text(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return _text(value.item())
    if isinstance(value, (list, tuple)):
        return [_text(v) for v in value]
    return value


def _flag(value: Any) -> Any:
    """A boolean attribute as `bool` whichever way it is stored (an HDF5 enum up to schema
    version 2 and in early version 3 files, int8 0/1 since); any other value unchanged."""
    value = _text(value)
    if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
        return bool(value)
    if isinstance(value, list) and value and all(isinstance(_flag(v), bool) for v in value):
        return [bool(v) for v in value]
    return value


_KIND = {int: "an integer >= 0", bool: "a boolean", str: "a string", list: "a list"}


def _typed(value: Any, kind: type) -> bool:
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    return isinstance(value, kind)


def read_attrs(path: Path, obj: h5py.HLObject | Flags | Fields, group: str) -> dict[str, Any]:
    """The attributes of `obj` as plain values; those the readers interpret (`ATTR_TYPES`
    of `group`, DATASET_ATTR_TYPES of a dataset) checked: an unreadable or mistyped
    attribute is one `RunFileError`."""
    values: dict[str, Any] = {}
    try:
        names = list(obj.attrs.keys())
        for name in names:
            values[name] = _text(obj.attrs[name])
    except (OSError, TypeError, ValueError, KeyError) as exc:
        raise RunFileError(f"{path}: cannot read the attributes of {obj.name} ({exc})") from None
    recorded = isinstance(obj, (h5py.Dataset, Flags, Fields))
    types = DATASET_ATTR_TYPES if recorded else ATTR_TYPES.get(group, {})
    listed = values.pop(BOOL_ATTRS, [])
    flags = {n for n, kind in types.items() if kind is bool}
    flags.update(n for n in (listed if isinstance(listed, list) else [listed]) if isinstance(n, str))
    for name in flags & values.keys():
        values[name] = _flag(values[name])
    for name, value in values.items():
        kind = types.get(name.partition(":")[0] if recorded else name)
        if kind is not None and not _typed(value, kind):
            shown = repr(value)
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            where = "/" + group
            raise RunFileError(f"{path}: attribute {name!r} of {where} is {shown}, expected "
                               f"{_KIND[kind]}: not a run file as mckmpi writes it")
    for name in ("world_size", "nnodes") if not group else ():
        if isinstance(values.get(name), int) and values[name] > MAX_RANKS:
            raise RunFileError(f"{path}: {name} {values[name]} is more than any job has "
                               f"({MAX_RANKS}): a damaged file")
    return values


@dataclass
class Run:
    """An open run file. Use as a context manager, or call `close()`."""

    path: Path
    file: h5py.File
    partial: bool = False
    note: str = ""  # partial files: one line on how the job ended and what the file holds
    _row_offsets: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    _recorded: dict[str, Recorded] = field(default_factory=dict, repr=False)

    @property
    def attrs(self) -> dict[str, Any]:
        return read_attrs(self.path, self.file, "")

    @property
    def provenance(self) -> dict[str, Any]:
        return self.group_attrs("provenance")

    @property
    def ranks(self) -> np.ndarray:
        """The per-rank table (structured array, one row per rank)."""
        return self.read("ranks")

    def datasets(self) -> list[str]:
        """Every recorded dataset path, in file order (dimension scales are labels, not data;
        a table stored one dataset per column is one name)."""
        names: list[str] = []
        self.file.visititems(lambda n, obj: names.append(n) if _is_recorded(obj) else None)
        return names

    def __contains__(self, key: str) -> bool:
        return key in self.file

    def __getitem__(self, key: str) -> Recorded:
        """A dataset, unread: slice it to load (``run['noise/fwq_ns'][0]``). Every schema
        version reads alike: a table is a structured dataset, booleans are `bool`. Datasets
        the readers interpret are checked against their layout (`DATASET_LAYOUTS`) first."""
        found = self._recorded.get(key)
        if found is not None:
            return found
        try:
            obj = self.file[key]
        except (KeyError, ValueError, OSError):
            raise RunFileError(f"{self.path}: no dataset {key!r}") from None
        ds = as_recorded(self.path, key, obj)
        if key in DATASET_LAYOUTS:
            _check_layout(self.path, key, ds)
        self._recorded[key] = ds
        return ds

    def dataset_attrs(self, key: str) -> dict[str, Any]:
        """A dataset's attributes (``kind``, ``units``, ... checked as the group's are)."""
        return read_attrs(self.path, self[key], key)

    def units(self, key: str, field: str = "") -> str:
        return self.dataset_attrs(key).get("units" if not field else f"units:{field}", "")

    def kind(self, key: str) -> str:
        """How a dataset is laid out across ranks (scalar, array, table; '' if unsaid)."""
        return self.dataset_attrs(key).get("kind", "")

    @property
    def world_size(self) -> int:
        """Ranks of the job (the root attribute, checked at open, else the /ranks table)."""
        size = self.attrs.get("world_size")
        if size is not None:
            return int(size)
        if "ranks" not in self.file:
            return 0
        ranks = self["ranks"]
        return int(ranks.shape[0]) if ranks.ndim else 0

    def group_attrs(self, group: str) -> dict[str, Any]:
        """Attributes of a group (``{}`` when the file has no such group)."""
        g = self.file.get(group)
        return {} if not isinstance(g, h5py.Group) else read_attrs(self.path, g, group)

    def members(self, group: str) -> list[str]:
        """Dataset names directly under `group`, sorted (``[]`` when absent)."""
        g = self.file.get(group)
        if not isinstance(g, h5py.Group):
            return []
        return sorted(k for k, v in g.items() if _is_recorded(v))

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
        n = self.length(key, rank)
        step = max(1, block)
        if ds.chunks:
            length = ds.chunks[1]
            step = max(length, step - step % length)
        for a in range(0, n, step):
            yield self.read(key, (rank, slice(a, min(n, a + step))))

    def length(self, key: str, rank: int) -> int:
        """Real rows of `rank` in an [ranks, n, ...] array: n, unless the ranks' streams
        ended at different lengths (the dataset's ``filled`` attribute; the rest is fill)."""
        ds = self[key]
        filled = ds.attrs.get("filled")
        if filled is not None and 0 <= rank < len(filled):
            return int(filled[rank])
        return int(ds.shape[1])

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
            size = self.world_size
            if ranks.size and not 0 <= int(ranks[0]) <= int(ranks[-1]) < size:
                raise RunFileError(f"{self.path}: {key!r} holds rows of rank "
                                   f"{int(ranks[-1]) if ranks[-1] >= size else int(ranks[0])}, "
                                   f"outside the job's {size} ranks")
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

    def to_xarray(self, group: str | None = None) -> Any:
        """The file as xarray: a dict of one `xarray.Dataset` per group ("/" is the root), or
        the Dataset of `group`; root attributes and provenance are in every Dataset's attrs.
        Needs the `analysis` extra (pandas, xarray)."""
        from mckmpi.trace.frames import run_to_xarray

        return run_to_xarray(self, group)

    def to_pandas(self, name: str = "ranks") -> Any:
        """A `pandas.DataFrame` of `name`: "ranks", a table ("offload/calls", "noise/detours",
        or its last part when unique), a group's per-rank scalars ("memory"), or any
        per-rank dataset in long form. Needs the `analysis` extra."""
        from mckmpi.trace.frames import run_to_pandas

        return run_to_pandas(self, name)

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_recorded(obj: Any) -> bool:
    """Whether a file object is recorded data: a dataset that is neither a dimension scale
    nor a column of a table, or a table stored one dataset per column."""
    if isinstance(obj, h5py.Group):
        return columns(obj) is not None
    return isinstance(obj, h5py.Dataset) and not is_scale(obj) and columns(obj.parent) is None


def is_complete(path: Path, attrs: Any) -> bool:
    """Complete means both: the attribute says so and the name is final."""
    return _flag(attrs.get("complete", False)) is True and not path.name.endswith(PARTIAL_SUFFIX)


def _check_layout(path: Path, key: str, ds: Recorded) -> None:
    kinds, ndim = DATASET_LAYOUTS[key]
    dims = "[ranks]" if ndim == 1 else "[ranks, n]"
    if isinstance(kinds, dict):
        # the columns it has must be of their kinds (a reader that needs a column checks
        # that it is there: the table may be a partial one, or an app's own)
        names = ds.dtype.names
        if names is None or ds.ndim != ndim:
            raise RunFileError(f"{path}: {key!r} should be a table, found {ds.ndim}-D "
                               f"{ds.dtype}")
        bad = [c for c, k in kinds.items() if c in names and ds.dtype[c].kind not in k]
        if bad:
            raise RunFileError(f"{path}: {key!r} has columns of the wrong type: "
                               f"{', '.join(f'{c} {ds.dtype[c]}' for c in bad)}")
    elif ds.dtype.kind not in kinds or ds.dtype.names is not None or ds.ndim != ndim:
        what = "integers" if kinds == "iu" else f"kind {kinds}"
        raise RunFileError(f"{path}: {key!r} should be {dims} {what}, "
                           f"found {ds.ndim}-D {ds.dtype}")


def open_run(path: str | Path, allow_incomplete: bool = False) -> Run:
    """Open and check a run file; a clear `RunFileError` for anything that is not one.
    `allow_incomplete` reads a partial file as far as it is consistent (see module doc)."""
    path = Path(path)
    if path.is_dir():
        raise RunFileError(f"{path} is a directory, not a run file "
                           "(`mckmpi study collect` takes a directory of runs)")
    if not path.is_file():
        partial = path.with_name(path.name + PARTIAL_SUFFIX)
        hint = f" (the job did not finish: its partial file is {partial})" \
            if partial.is_file() else ""
        raise RunFileError(f"no such run file: {path}{hint}")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise RunFileError(f"{path}: not a readable HDF5 file ({exc})") from None
    try:
        schema = _text(f.attrs.get("schema"))
        version = _text(f.attrs.get("schema_version"))
        complete = is_complete(path, f.attrs)
    except (OSError, TypeError, ValueError) as exc:
        f.close()
        raise RunFileError(f"{path}: not an mckmpi run file (unreadable schema: {exc})") from None
    problem = None
    if not isinstance(schema, str) or schema != SCHEMA:
        shown = repr(schema) if len(repr(schema)) <= 40 else repr(schema)[:37] + "..."
        problem = f"not an mckmpi run file (schema {shown})"
    elif not _typed(version, int) or version < 1:
        shown = repr(version) if len(repr(version)) <= 40 else repr(version)[:37] + "..."
        problem = f"schema version {shown} is not supported"
    elif version > SCHEMA_VERSION:
        problem = (f"written with schema version {version}, newer than this mckmpi reads "
                   f"({SCHEMA_VERSION}): upgrade mckmpi")
    elif version < OLDEST_SCHEMA_VERSION:
        problem = f"schema version {version} is not supported"
    elif not complete and not allow_incomplete:
        hint = " (a job stopped before it was written; `mckmpi report` reads what it holds)" \
            if path.name.endswith(PARTIAL_SUFFIX) else ""
        problem = f"incomplete run file{hint}"
    elif complete and not len(f):
        problem = "holds no data, only a run file's header"
    if problem:
        f.close()
        raise RunFileError(f"{path}: {problem}")
    try:
        read_attrs(path, f, "")  # the root attributes the readers interpret, type-checked
    except RunFileError:
        f.close()
        raise
    if complete:
        return Run(path, f)
    if not spool_dir(path).is_dir():
        return Run(path, f, partial=True, note=f"{path}: incomplete run file, "
                   f"ending {_text(f.attrs.get('ending', 'unknown'))}; no spooled data")
    try:
        return _recover(path, f)
    finally:
        f.close()


def _recover(path: Path, header: h5py.File) -> Run:
    """The header and every rank's spool, laid out in an in-memory file."""
    ranks = header.get("ranks")
    rows = ranks.get("rank") if isinstance(ranks, h5py.Group) else ranks
    size = int(header.attrs.get("world_size", rows.shape[0] if rows is not None else 0))
    directory = spool_dir(path)
    spools = []
    for rank in range(size):
        target = spool_path(directory, rank)
        try:
            spools.append(read_spool(target) if target.is_file() else None)
        except (OSError, ValueError) as exc:
            raise RunFileError(f"{target}: unreadable spool ({exc})") from None
    manifests = [{} if sp is None else
                 {k: (kind, data.dtype.descr if data.dtype.names else data.dtype.str,
                      data.shape, units, stream)
                  for k, (kind, data, units, stream) in sp.records.items()}
                 for sp in spools]
    try:
        layouts = merge(manifests)
    except ValueError as exc:
        raise RunFileError(f"{path}: spools disagree ({exc})") from None
    # The header's own datasets (the /ranks table) stay as they are.
    layouts = [lay for lay in layouts if lay.key not in header]
    group_attrs: dict[str, dict[str, Any]] = {}
    for sp in reversed([sp for sp in spools if sp is not None]):
        for group, values in sp.attrs.items():
            group_attrs.setdefault(group, {}).update(values)  # rank 0's values win
    ending = job_ending([None if sp is None else sp.ending for sp in spools])
    root = {k: v for k, v in header.attrs.items() if k not in ("schema", "schema_version",
                                                                "complete", BOOL_ATTRS)}
    root.update(ending)
    f = h5py.File(f"{path}#recovered-{id(spools)}", "w", driver="core", backing_store=False)
    for name in header:
        header.copy(header[name], f, name=name)
    unlabel(f)  # the copies' dimension scales still refer to the header file
    datasets = write_header(f, layouts, root, {}, group_attrs, compress=False)
    for rank, sp in enumerate(spools):
        if sp is not None:
            write_records(layouts, datasets, rank, {k: v[1] for k, v in sp.records.items()})
    silent = [r for r, sp in enumerate(spools) if sp is None or sp.ending is None]
    torn = [r for r, sp in enumerate(spools) if sp is not None and sp.torn]
    note = (f"{path}: partial run file (the job did not finish), ending {ending['ending']}"
            + (f" {ending['signal']}" if ending["signal"] else "")
            + (f" on rank {ending['ending_rank']}" if ending["ending_rank"] >= 0 else "")
            + (f" ({ending['error']})" if ending["error"] else "")
            + "; data up to each rank's last flush"
            + (f"; no ending from rank(s) {_ranks(silent)}" if silent else "")
            + (f"; last frame cut short on rank(s) {_ranks(torn)}" if torn else ""))
    return Run(path, f, partial=True, note=note)


def _ranks(ranks: list[int]) -> str:
    return ",".join(map(str, ranks[:8])) + ("..." if len(ranks) > 8 else "")
