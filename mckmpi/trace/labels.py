"""Labels that make a run file readable by netCDF tools and xarray without mckmpi.

`label(f)` runs once the writer has created every dataset (before any data is written) and
adds what the netCDF-4 data model needs on top of plain HDF5:

- HDF5 dimension scales on every axis. The rank axis is a coordinate variable ``rank``
  (0..ranks-1) in each group that holds per-rank data; every other axis is a netCDF
  dimension without a variable (``sample``, ``iteration``, ``offload_call``, ... from
  `schema.DIMENSIONS`), created unlimited and empty, so it costs no storage and readers take
  its length from the data. Two datasets of one group only share a dimension when their
  lengths agree; otherwise the second gets its own (``NAME_DIM``).
- Units on every numeric dataset (``units``) and table field (``units:FIELD``; ``units`` of
  the field's dataset from version 3) that was recorded without them
  (`schema.default_units`); booleans (int8 flags from version 3) have none.

From version 3 a record with fields is a group of one dataset per field (`columns`): each
field is labelled as the record would be (its table's row dimension, or ``rank``), with the
dimension scales in the group that holds the table, so every table of a group shares them.

Everything here is metadata derived from the created datasets alone, in sorted order, so
every rank of a parallel writer makes the same calls (collective metadata); the only data
written is the small ``rank`` coordinate, identical from every rank.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import h5py
import numpy as np

from mckmpi.trace.schema import (
    ARRAY,
    BOOL_STORED,
    DIMENSIONS,
    RANK_DIM,
    SCALAR,
    TABLE,
    default_units,
)

#: The NAME attribute netCDF-4 gives a dimension that has no coordinate variable.
DIMENSION_ONLY = "This is a netCDF dimension but not a netCDF variable."


def is_scale(obj: object) -> bool:
    """Whether `obj` is a dimension scale this module (or netCDF) added, not recorded data."""
    if not isinstance(obj, h5py.Dataset):
        return False
    cls = obj.attrs.get("CLASS")
    return (cls.decode() if isinstance(cls, bytes) else cls) == "DIMENSION_SCALE"


def columns(obj: object) -> list[str] | None:
    """The fields, in order, of a record stored one dataset per field (a group with
    attributes ``kind`` and ``columns``), else None."""
    if not isinstance(obj, h5py.Group) or "columns" not in obj.attrs or "kind" not in obj.attrs:
        return None
    return [c.decode() if isinstance(c, bytes) else str(c) for c in np.atleast_1d(obj.attrs["columns"])]


def is_flags(ds: h5py.Dataset) -> bool:
    """Whether `ds` holds booleans stored as CF flags (int8 0/1, schema version 3)."""
    return ds.dtype == BOOL_STORED and ds.attrs.get("flag_meanings") is not None


def dimension_names(key: str, kind: str, shape: tuple[int, ...],
                    dimensions: Mapping[str, tuple[str, ...]] = DIMENSIONS) -> tuple[str, ...]:
    """The axis names of recorded dataset `key` (also what `to_xarray` uses for files written
    before the labels existed); `dimensions` names them (the run file's by default)."""
    name = key.rsplit("/", 1)[-1]
    if kind == TABLE:
        return dimensions.get(key, (f"{name}_row",))[:1]
    if kind in (SCALAR, ARRAY) and shape:
        inner = dimensions.get(key, ())
        rest = tuple(inner[i] if i < len(inner) else f"{name}_dim{i}" for i in range(len(shape) - 1))
        return (RANK_DIM,) + rest
    return tuple(f"{name}_dim{i}" for i in range(len(shape)))


def _recorded(f: h5py.File) -> list[tuple[str, h5py.Dataset]]:
    found: list[tuple[str, h5py.Dataset]] = []
    f.visititems(lambda n, o: found.append((n, o)) if isinstance(o, h5py.Dataset)
                 and not is_scale(o) else None)
    return sorted(found, key=lambda item: item[0])


@dataclass(frozen=True)
class _Entry:
    """A recorded dataset as labelled: the record it belongs to (`key`, `kind`), its field
    of that record ("" for a whole dataset) and the group whose dimensions it uses."""

    key: str
    field: str
    kind: str
    ds: h5py.Dataset
    home: h5py.Group


def _entries(f: h5py.File) -> list[_Entry]:
    entries = []
    for key, ds in _recorded(f):
        parent = ds.parent
        if columns(parent) is not None:
            entries.append(_Entry(key.rsplit("/", 1)[0], key.rsplit("/", 1)[1], kind_of(parent),
                                  ds, parent.parent))
        else:
            entries.append(_Entry(key, "", kind_of(ds), ds, parent))
    return entries


def kind_of(ds: h5py.Dataset | h5py.Group) -> str:
    """The recorded kind of `ds` (scalar, array, table; "" for data written otherwise)."""
    kind = ds.attrs.get("kind", "")
    return kind.decode() if isinstance(kind, bytes) else str(kind)


def _units(entry: _Entry) -> None:
    ds = entry.ds
    if is_flags(ds) or entry.field == "rank":
        return
    names = ds.dtype.names
    if names is None:
        if "units" not in ds.attrs:
            unit = default_units(entry.key, entry.field, ds.dtype)
            if unit:
                ds.attrs["units"] = unit
        return
    for field in names:  # a compound dataset (version 2, or data written otherwise)
        if field == "rank" or f"units:{field}" in ds.attrs:
            continue
        unit = default_units(entry.key, field, ds.dtype.fields[field][0])
        if unit:
            ds.attrs[f"units:{field}"] = unit


class _Group:
    """The dimensions of one HDF5 group, created on first use."""

    def __init__(self, group: h5py.Group, ranks: int) -> None:
        self.group, self.ranks = group, ranks
        self.scales: dict[str, h5py.Dataset] = {}
        self.lengths: dict[str, int] = {RANK_DIM: ranks}

    def scale(self, dim: str, length: int, owner: str) -> h5py.Dataset:
        if dim in self.lengths and self.lengths[dim] != length:
            dim = f"{owner}_{dim}"
        if dim not in self.scales:
            name = dim
            while name in self.group and not is_scale(self.group[name]):
                name += "_dim"  # a recorded dataset already has the name
            if name in self.group:
                ds = self.group[name]
            elif dim == RANK_DIM and length == self.ranks:
                ds = self.group.create_dataset(name, data=np.arange(length, dtype=np.int32))
                ds.make_scale(name)
                ds.attrs["units"] = "1"
            else:
                ds = self.group.create_dataset(name, shape=(0,), maxshape=(None,), dtype="f4")
                ds.make_scale(DIMENSION_ONLY)
            self.scales[dim], self.lengths[dim] = ds, length
        return self.scales[dim]


def _ranks(f: h5py.File, entries: list[_Entry]) -> int:
    size = f.attrs.get("world_size")
    if size is not None:
        return int(size)
    counts = [e.ds.shape[0] for e in entries if e.kind in (SCALAR, ARRAY) and e.ds.shape]
    return max(counts, default=0)


def label(f: h5py.File, dimensions: Mapping[str, tuple[str, ...]] = DIMENSIONS) -> None:
    """Attach dimension scales and units to every recorded dataset of `f` (collective when
    `f` is open with the mpio driver: every rank must call it after the same creations);
    `dimensions` names the axes (the run file's by default; a study file has its own)."""
    entries = _entries(f)
    ranks = _ranks(f, entries)
    groups: dict[str, _Group] = {}
    for entry in entries:
        _units(entry)
        home = entry.home.name
        if home not in groups:
            groups[home] = _Group(entry.home, ranks)
        name = entry.key.rsplit("/", 1)[-1]
        ds = entry.ds
        for axis, dim in enumerate(dimension_names(entry.key, entry.kind, ds.shape, dimensions)):
            ds.dims[axis].attach_scale(groups[home].scale(dim, ds.shape[axis], name))


def unlabel(f: h5py.File) -> None:
    """Drop the labels of objects copied into `f` from another file: their references still
    point into that file, so HDF5 cannot follow or extend them. `label` labels them afresh."""
    scales: list[str] = []
    plain: list[h5py.Dataset] = []
    f.visititems(lambda n, o: (scales.append(n) if is_scale(o) else plain.append(o))
                 if isinstance(o, h5py.Dataset) else None)
    for ds in plain:
        if "DIMENSION_LIST" in ds.attrs:
            del ds.attrs["DIMENSION_LIST"]
    for name in scales:
        del f[name]
