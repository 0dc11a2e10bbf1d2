"""Run files as pandas DataFrames and xarray Datasets, for notebooks.

pandas and xarray are the optional `analysis` extra: they are imported here, when a user
asks for a frame, never by the runtime, the ranks or the rest of the reader.

Names follow the file: per-rank data lies along ``rank``, other axes along the dimension
names the file's labels give (`mckmpi.trace.labels`; the same names for files written before
the labels existed). Text (fixed-width bytes in HDF5) becomes `str`; units go to the
``units`` attribute of each xarray variable and to ``DataFrame.attrs["units"]`` (column ->
units).
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from mckmpi.errors import UsageError
from mckmpi.trace.labels import columns as stored_columns
from mckmpi.trace.labels import dimension_names, kind_of
from mckmpi.trace.schema import TABLE

if TYPE_CHECKING:
    import pandas
    import xarray

#: An open `mckmpi.trace.reader.Run` (not imported: the reader imports this module).
Run = Any


def need(module: str) -> ModuleType:
    """Import `module` of the `analysis` extra, or say in one line how to get it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(f"{module} is not installed: pip install 'mckmpi[analysis]'") from None


def text(values: np.ndarray) -> np.ndarray:
    """Fixed-width bytes as `str` (other dtypes unchanged)."""
    if values.dtype.kind == "S":
        return np.array([v.decode(errors="replace") for v in values.ravel().tolist()],
                        dtype=object).reshape(values.shape)
    return values


def columns(rows: np.ndarray) -> dict[str, np.ndarray]:
    """A structured array as a dict of plain columns, text decoded."""
    return {name: text(rows[name]) for name in rows.dtype.names or ()}


def _dims(key: str, ds: Any) -> tuple[str, ...]:
    """The file's dimension names of `ds` (its scales), else the schema's."""
    names = []
    for axis in ds.dims:
        scales = list(axis.values())
        if not scales:
            return dimension_names(key, kind_of(ds), ds.shape)
        names.append(scales[0].name.rsplit("/", 1)[-1])
    return tuple(names)


def _units(ds: Any, field: str = "") -> str:
    value = ds.attrs.get(f"units:{field}" if field else "units", "")
    return value.decode() if isinstance(value, bytes) else str(value)


def _attrs(run: Run, group: str) -> dict[str, Any]:
    attrs = dict(run.attrs)
    attrs.update({f"provenance_{k}": v for k, v in run.provenance.items()})
    if group != "/":
        attrs.update(run.group_attrs(group))
    return attrs


def _groups(run: Run) -> list[str]:
    found = ["/"]
    run.file.visititems(lambda n, o: found.append(n) if isinstance(o, h5py.Group)
                        and stored_columns(o) is None else None)  # a table is data, not a group
    # /provenance is in every Dataset's attrs already; other groups may hold only attrs
    return [g for g in found if g == "/" or run.members(g)
            or (run.group_attrs(g) and g != "provenance")]


def _group_dataset(run: Run, group: str) -> xarray.Dataset:
    xr = need("xarray")
    variables: dict[str, Any] = {}
    coords: dict[str, Any] = {}
    for name in run.members(group):
        key = name if group == "/" else f"{group}/{name}"
        ds = run[key]
        dims = _dims(key, ds)
        data = run.read(key)
        if data.dtype.names is None:
            variables[name] = xr.Variable(dims, text(data), {"units": _units(ds)} if _units(ds) else {})
            continue
        prefix = f"{name}_" if kind_of(ds) == TABLE else ""
        for field, values in columns(data).items():
            if not prefix and field == "rank":
                continue  # the rank coordinate itself
            unit = _units(ds, field)
            variables[prefix + field] = xr.Variable(dims, values, {"units": unit} if unit else {})
    if any("rank" in v.dims for v in variables.values()):
        coords["rank"] = ("rank", np.arange(run.world_size, dtype=np.int32))
    return xr.Dataset(variables, coords=coords, attrs=_attrs(run, group))


def run_to_xarray(run: Run, group: str | None = None) -> dict[str, xarray.Dataset] | xarray.Dataset:
    """One `xarray.Dataset` per group of `run` (keys "/", "noise", "offload", ...), or the
    Dataset of `group`. Reads the data into memory: for one huge array, open the file lazily
    with ``xarray.open_dataset(path, engine="h5netcdf", group=...)``."""
    if group is not None:
        group = group.strip("/") or "/"
        found = run.file.get(group)
        if not isinstance(found, h5py.Group) or stored_columns(found) is not None:
            raise UsageError(f"{run.path}: no group {group!r} (groups: {', '.join(_groups(run))})")
        return _group_dataset(run, group)
    return {g: _group_dataset(run, g) for g in _groups(run)}


def _resolve(run: Run, name: str) -> str:
    key = name.strip("/")
    if key in run.file:
        return key
    tables = [k for k in run.datasets() if k.rsplit("/", 1)[-1] == key]
    if len(tables) == 1:
        return tables[0]
    choices = ["ranks"] + sorted({g for g in _groups(run) if g != "/"}) + sorted(
        k for k in run.datasets() if k != "ranks")
    raise UsageError(f"{run.path}: no table {name!r} (one of: {', '.join(choices)})")


def _frame(data: dict[str, Any], units: dict[str, str]) -> pandas.DataFrame:
    pd = need("pandas")
    frame = pd.DataFrame(data)
    frame.attrs["units"] = {k: v for k, v in units.items() if v}
    return frame


def run_to_pandas(run: Run, name: str = "ranks") -> pandas.DataFrame:
    """`name` as a DataFrame: a table (one row per record, with its ``rank`` column), the
    per-rank scalars of a group (one row per rank), or a per-rank array in long form
    (``rank``, the axis, the value)."""
    key = _resolve(run, name)
    group = run.file[key]
    if isinstance(group, h5py.Group) and stored_columns(group) is None:
        data: dict[str, Any] = {"rank": np.arange(run.world_size, dtype=np.int32)}
        units = {}
        for member in run.members(key):
            ds = run[f"{key}/{member}"]
            if ds.ndim == 1 and ds.dtype.names is None and _dims(ds.name, ds) == ("rank",):
                data[member] = text(run.read(f"{key}/{member}"))
                units[member] = _units(ds)
        return _frame(data, units)
    obj = run[key]
    data_ = run.read(key)
    if data_.dtype.names is not None:
        return _frame(columns(data_), {f: _units(obj, f) for f in data_.dtype.names})
    dims = _dims(key, obj)
    column = key.rsplit("/", 1)[-1]
    if data_.ndim == 0:
        return _frame({column: [text(data_).item()]}, {column: _units(obj)})
    grids = np.meshgrid(*[np.arange(n) for n in data_.shape], indexing="ij")
    long = {dim: grid.ravel() for dim, grid in zip(dims, grids)}
    long[column] = text(data_).ravel()
    return _frame(long, {column: _units(obj)})

