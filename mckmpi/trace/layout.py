"""The layout of recorded data in a run file: shared by the writer and the reader's recovery.

Every rank describes what it recorded in a small manifest (names, kinds, dtypes, shapes);
the merged manifests give every rank the same `Layout`s, which is what parallel HDF5 needs
(every rank creates the same datasets in the same order, then writes its own slice), and
what the reader needs to lay out the spools of a partial file exactly as the writer would.
`create_dataset` is the one place a recorded name becomes a dataset.

Pure h5py and numpy: no MPI, no runtime (post-processing imports it).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import h5py
import numpy as np

from mckmpi.trace.labels import label
from mckmpi.trace.schema import (
    ARRAY,
    BOOL_ATTRS,
    BOOL_STORED,
    FLAG_MEANINGS,
    SCALAR,
    SCHEMA,
    SCHEMA_VERSION,
    TABLE,
)
from mckmpi.trace.tracer import Record

#: Datasets above this size are chunked (and compressed when one writer writes them).
CHUNK_THRESHOLD = 1 << 20
#: Target size of one chunk of a per-rank array.
CHUNK_BYTES = 1 << 20
#: Largest slice of one record handed to HDF5 in one write call.
WRITE_BLOCK = 64 << 20


@dataclass(frozen=True)
class Layout:
    """The dataset one recorded name becomes, identical on every rank."""

    key: str
    kind: str
    dtype: np.dtype
    shape: tuple[int, ...]
    units: dict[str, str]
    offsets: tuple[int, ...]  # tables: first row of each rank (len = ranks + 1)
    filled: tuple[int, ...] = ()  # streams of unequal length: real rows of each rank


def manifest(records: dict[str, Record]) -> dict[str, tuple]:
    """What this rank recorded: name -> (kind, dtype, shape, units, is a stream)."""
    out = {}
    for k, r in records.items():
        data = r.current()
        out[k] = (r.kind, data.dtype.descr if data.dtype.names else data.dtype.str,
                  data.shape, r.units, r.stream is not None)
    return out


def merge(manifests: list[dict[str, tuple]]) -> list[Layout]:
    """The job's layouts from every rank's manifest (index = rank; {} for a silent rank)."""
    size = len(manifests)
    layouts = []
    for key in sorted({k for m in manifests for k in m}):
        entries = [(r, m[key]) for r, m in enumerate(manifests) if key in m]
        kinds = {e[1][0] for e in entries}
        dtypes = {str(e[1][1]) for e in entries}
        if len(kinds) != 1 or len(dtypes) != 1:
            raise ValueError(f"trace {key}: ranks disagree on kind/dtype ({kinds}, {dtypes})")
        kind, descr, _, units, _ = entries[0][1]
        dtype = np.dtype(descr if isinstance(descr, str) else [tuple(f) for f in descr])
        offsets: tuple[int, ...] = ()
        filled: tuple[int, ...] = ()
        if kind == TABLE:
            counts = [m[key][2][0] if key in m else 0 for m in manifests]
            offsets = tuple(int(x) for x in np.concatenate([[0], np.cumsum(counts)]))
            dtype = np.dtype([("rank", "i4")] + [(n, dtype.fields[n][0]) for n in dtype.names])
            shape: tuple[int, ...] = (offsets[-1],)
        elif all(e[1][4] for e in entries) and len({tuple(e[1][2][1:]) for e in entries}) == 1:
            # Streams: the same rows, any number of them per rank.
            lengths = [m[key][2][0] if key in m else 0 for m in manifests]
            shape = (size, max(lengths)) + tuple(entries[0][1][2][1:])
            if len(set(lengths)) > 1:
                filled = tuple(lengths)
        else:
            shapes = {tuple(e[1][2]) for e in entries}
            if len(shapes) != 1:
                raise ValueError(f"trace {key}: ranks recorded different shapes {sorted(shapes)}")
            shape = (size,) + shapes.pop()
        layouts.append(Layout(key, kind, dtype, shape, units, offsets, filled))
    return layouts


class Columns:
    """A record with fields as the file stores it from schema version 3: one dataset per
    field (netCDF-C cannot show HDF5 compound types). Written like the one compound
    dataset it replaces: ``columns[selection] = rows`` writes every field's part."""

    def __init__(self, datasets: dict[str, h5py.Dataset]) -> None:
        self.datasets = datasets

    @property
    def chunks(self) -> tuple[int, ...] | None:
        return next(iter(self.datasets.values())).chunks

    def __setitem__(self, selection: Any, rows: np.ndarray) -> None:
        for name, ds in self.datasets.items():
            ds[selection] = rows[name]


def create_dataset(f: h5py.File, lay: Layout, compress: bool) -> h5py.Dataset | Columns:
    """The one place a recorded name becomes a dataset: chunks, fill, kind and units. A
    record with fields becomes a group of one dataset per field (`Columns`); booleans are
    int8 with CF flag attributes (HDF5 enums are invisible to netCDF-C)."""
    big = int(np.prod(lay.shape)) * lay.dtype.itemsize > CHUNK_THRESHOLD
    if lay.dtype.names is None:
        ds = _create(f, lay, compress, big)
        ds.attrs["kind"] = lay.kind
        if lay.filled:
            ds.attrs["filled"] = np.asarray(lay.filled, dtype=np.int64)
        return ds
    group = f.create_group(lay.key)
    group.attrs["kind"] = lay.kind
    group.attrs["columns"] = list(lay.dtype.names)
    if lay.filled:
        group.attrs["filled"] = np.asarray(lay.filled, dtype=np.int64)
    datasets = {}
    for name in lay.dtype.names:
        unit = lay.units.get(name)
        column = replace(lay, key=f"{lay.key}/{name}", dtype=lay.dtype.fields[name][0],
                         units={"": unit} if unit else {})
        datasets[name] = _create(f, column, compress, big)
    return Columns(datasets)


def write_table(f: h5py.File, key: str, rows: np.ndarray, compress: bool = True) -> None:
    """A whole table of one writer (a study's runs and points) laid out as run files lay out
    theirs: one dataset per field, no rank column added. `label` names its rows."""
    lay = Layout(key, TABLE, rows.dtype, rows.shape, {}, ())
    columns = create_dataset(f, lay, compress)
    if len(rows):
        columns[:] = rows


def _create(f: h5py.File, lay: Layout, compress: bool, big: bool) -> h5py.Dataset:
    """One dataset of plain values (a whole record or one field of it); `big`: the record is
    above `CHUNK_THRESHOLD`, so it is chunked (and compressed), every field alike."""
    dtype = BOOL_STORED if lay.dtype.kind == "b" else lay.dtype
    kwargs: dict[str, Any] = {}
    if big and lay.shape[0] > 0:
        kwargs["chunks"] = _chunks(replace(lay, dtype=dtype))
        if compress:
            kwargs.update(compression="gzip", compression_opts=1, shuffle=True)
    if lay.kind != TABLE and dtype.kind == "f":
        kwargs["fillvalue"] = np.nan
    ds = f.create_dataset(lay.key, shape=lay.shape, dtype=dtype, **kwargs)
    if lay.dtype.kind == "b":
        ds.attrs["flag_values"] = np.array([0, 1], dtype=BOOL_STORED)
        ds.attrs["flag_meanings"] = FLAG_MEANINGS
    for field_name, unit in lay.units.items():
        ds.attrs["units" if not field_name else f"units:{field_name}"] = unit
    return ds


def _chunks(lay: Layout) -> tuple[int, ...] | bool:
    """Per-rank arrays: one rank per chunk row, about `CHUNK_BYTES` each, so reading or
    writing one rank never decompresses another's data. Other kinds: h5py's guess."""
    if lay.kind != ARRAY or len(lay.shape) < 2 or 0 in lay.shape:
        return True
    inner = int(np.prod(lay.shape[2:])) * lay.dtype.itemsize
    length = max(1, min(lay.shape[1], CHUNK_BYTES // max(1, inner)))
    return (1, length) + tuple(lay.shape[2:])


def _blocks(count: int, row_bytes: int, align: int) -> list[tuple[int, int]]:
    """[start, stop) ranges over `count` rows of `row_bytes`, each at most `WRITE_BLOCK`
    bytes (at least one row) and a multiple of `align` rows long."""
    step = max(1, WRITE_BLOCK // max(1, row_bytes))
    step = max(align, step - step % align) if align > 1 else step
    return [(a, min(a + step, count)) for a in range(0, count, step)]


def _write_record(ds: h5py.Dataset | Columns, lay: Layout, rank: int, data: np.ndarray) -> None:
    """This rank's part of one dataset, in bounded blocks."""
    if isinstance(ds, Columns) and lay.kind == TABLE:  # column by column, the rank added
        first = lay.offsets[rank]
        for name, column in ds.datasets.items():
            for a, b in _blocks(data.shape[0], column.dtype.itemsize, 1):
                column[first + a:first + b] = np.full(b - a, rank, dtype=column.dtype) \
                    if name == "rank" else data[name][a:b]
        return
    if lay.kind != ARRAY or data.ndim == 0:
        ds[rank] = data
        return
    chunks = ds.chunks
    align = chunks[1] if chunks else 1
    row_bytes = int(np.prod(data.shape[1:])) * data.dtype.itemsize
    for a, b in _blocks(data.shape[0], row_bytes, align):
        ds[rank, a:b] = data[a:b]


def _is_bool(value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return True
    if isinstance(value, (list, tuple, np.ndarray)) and len(value):
        return all(isinstance(v, (bool, np.bool_)) for v in np.asarray(value, dtype=object).flat)
    return False


def write_attrs(obj: h5py.HLObject, values: dict[str, Any]) -> None:
    """The one way attributes reach a file: None is "", booleans (and lists of them) are
    int8 0/1 named in the object's `BOOL_ATTRS` list, since netCDF-C leaves HDF5 enum
    attributes out. Deterministic, so every rank of a parallel writer makes the same calls."""
    stored = obj.attrs.get(BOOL_ATTRS)
    before = [] if stored is None else [n.decode() if isinstance(n, bytes) else str(n)
                                         for n in np.atleast_1d(stored)]
    flags = list(before)
    for k, v in values.items():
        if _is_bool(v):
            obj.attrs[k] = np.asarray(v, dtype=BOOL_STORED)
            if k not in flags:
                flags.append(k)
        else:
            obj.attrs[k] = "" if v is None else v
            if k in flags:
                flags.remove(k)
    if flags != before:
        if flags:
            obj.attrs[BOOL_ATTRS] = flags
        elif stored is not None:
            del obj.attrs[BOOL_ATTRS]


def write_header(
    f: h5py.File,
    layouts: list[Layout],
    root_attrs: dict[str, Any],
    provenance: dict[str, Any],
    group_attrs: dict[str, dict[str, Any]],
    compress: bool,
) -> list[h5py.Dataset | Columns]:
    """Attributes and every dataset, created empty (collectively when parallel)."""
    write_attrs(f, {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "complete": False})
    write_attrs(f, root_attrs)
    write_attrs(f.require_group("provenance"), provenance)
    datasets = [create_dataset(f, lay, compress) for lay in layouts]
    for group, values in sorted(group_attrs.items()):
        write_attrs(f.require_group(group), values)
    label(f)
    return datasets


def write_records(layouts: list[Layout], datasets: list[h5py.Dataset | Columns], rank: int,
                  records: dict[str, np.ndarray]) -> None:
    """Rank `rank`'s data (record name -> current array) into the datasets."""
    for lay, ds in zip(layouts, datasets):
        data = records.get(lay.key)
        if data is not None and not (lay.kind != SCALAR and data.ndim and data.shape[0] == 0):
            _write_record(ds, lay, rank, data)


def current(records: dict[str, Record]) -> dict[str, np.ndarray]:
    """Name -> what each record holds now."""
    return {k: r.current() for k, r in records.items()}


