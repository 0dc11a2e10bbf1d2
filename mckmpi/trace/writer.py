"""Writing one run file per job from the tracers of all ranks.

Every rank first shares a small manifest of what it recorded (names, kinds, dtypes,
shapes); from the merged manifest all ranks derive the same layout, which is what parallel
HDF5 needs: every rank creates the same datasets in the same order, then writes only its
own slice (`driver="mpio"`). Without MPI support in h5py, or when asked, the data is
gathered to rank 0, which writes the same layout alone.

The file is created as ``NAME.partial`` with ``complete = False``, flipped to True after the
last byte, closed, and only then renamed: a job killed while writing leaves a file that
says it is incomplete, never one that looks complete.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from mckmpi.trace.schema import PARTIAL_SUFFIX, SCHEMA, SCHEMA_VERSION, TABLE
from mckmpi.trace.tracer import Record, Tracer

if TYPE_CHECKING:
    from mpi4py import MPI

#: Datasets above this size are chunked (and compressed when one writer writes them).
CHUNK_THRESHOLD = 1 << 20


@dataclass(frozen=True)
class Layout:
    """The dataset one recorded name becomes, identical on every rank."""

    key: str
    kind: str
    dtype: np.dtype
    shape: tuple[int, ...]
    units: dict[str, str]
    offsets: tuple[int, ...]  # tables: first row of each rank (len = ranks + 1)


def parallel_available() -> bool:
    return bool(h5py.get_config().mpi)


def _manifest(tracer: Tracer) -> dict[str, tuple]:
    return {k: (r.kind, r.data.dtype.descr if r.data.dtype.names else r.data.dtype.str,
                r.data.shape, r.units)
            for k, r in tracer.records.items()}


def _merge(manifests: list[dict[str, tuple]]) -> list[Layout]:
    size = len(manifests)
    layouts = []
    for key in sorted({k for m in manifests for k in m}):
        entries = [(r, m[key]) for r, m in enumerate(manifests) if key in m]
        kinds = {e[1][0] for e in entries}
        dtypes = {str(e[1][1]) for e in entries}
        if len(kinds) != 1 or len(dtypes) != 1:
            raise ValueError(f"trace {key}: ranks disagree on kind/dtype ({kinds}, {dtypes})")
        kind, descr, _, units = entries[0][1]
        dtype = np.dtype(descr if isinstance(descr, str) else [tuple(f) for f in descr])
        offsets: tuple[int, ...] = ()
        if kind == TABLE:
            counts = [m[key][2][0] if key in m else 0 for m in manifests]
            offsets = tuple(int(x) for x in np.concatenate([[0], np.cumsum(counts)]))
            dtype = np.dtype([("rank", "i4")] + [(n, dtype.fields[n][0]) for n in dtype.names])
            shape: tuple[int, ...] = (offsets[-1],)
        else:
            shapes = {tuple(e[1][2]) for e in entries}
            if len(shapes) != 1:
                raise ValueError(f"trace {key}: ranks recorded different shapes {sorted(shapes)}")
            shape = (size,) + shapes.pop()
        layouts.append(Layout(key, kind, dtype, shape, units, offsets))
    return layouts


def _create(f: h5py.File, lay: Layout, compress: bool) -> h5py.Dataset:
    nbytes = int(np.prod(lay.shape)) * lay.dtype.itemsize
    kwargs: dict[str, Any] = {}
    if nbytes > CHUNK_THRESHOLD and lay.shape[0] > 0:
        kwargs["chunks"] = True
        if compress:
            kwargs.update(compression="gzip", compression_opts=1, shuffle=True)
    if lay.kind != TABLE and lay.dtype.kind == "f":
        kwargs["fillvalue"] = np.nan
    ds = f.create_dataset(lay.key, shape=lay.shape, dtype=lay.dtype, **kwargs)
    ds.attrs["kind"] = lay.kind
    for field, unit in lay.units.items():
        ds.attrs["units" if not field else f"units:{field}"] = unit
    return ds


def _slab(lay: Layout, rank: int, rec: Record) -> tuple[slice | int, np.ndarray]:
    if lay.kind == TABLE:
        rows = np.empty(rec.data.shape[0], dtype=lay.dtype)
        rows["rank"] = rank
        for name in rec.data.dtype.names:
            rows[name] = rec.data[name]
        return slice(lay.offsets[rank], lay.offsets[rank + 1]), rows
    return rank, rec.data


def _write_attrs(obj: h5py.HLObject, values: dict[str, Any]) -> None:
    for k, v in values.items():
        obj.attrs[k] = "" if v is None else v


def write_run(
    comm: MPI.Intracomm,
    path: Path,
    tracer: Tracer,
    root_attrs: dict[str, Any],
    provenance: dict[str, Any],
    method: str = "auto",
) -> Path:
    """Write the job's run file at `path` (collective over `comm`); returns the final path."""
    rank, size = comm.Get_rank(), comm.Get_size()
    layouts = _merge(comm.allgather(_manifest(tracer)))
    # Attribute values must be identical on every rank for collective metadata writes.
    root_attrs, provenance, group_attrs = comm.bcast(
        (root_attrs, provenance, tracer.group_attrs) if rank == 0 else None, root=0)
    parallel = method == "parallel" or (method == "auto" and parallel_available())
    if method == "parallel" and not parallel_available():
        raise RuntimeError("trace_writer=parallel, but h5py was built without MPI")
    partial = path.with_name(path.name + PARTIAL_SUFFIX)

    if parallel:
        with h5py.File(partial, "w", driver="mpio", comm=comm) as f:
            _write_all(f, layouts, root_attrs, provenance, group_attrs, compress=False,
                       slabs=[(rank, tracer.records)])
            comm.Barrier()
            f.attrs["complete"] = True
    else:
        gathered = comm.gather(tracer.records, root=0)
        if rank == 0:
            with h5py.File(partial, "w") as f:
                _write_all(f, layouts, root_attrs, provenance, group_attrs, compress=True,
                           slabs=list(enumerate(gathered)))
                f.attrs["complete"] = True
    comm.Barrier()
    if rank == 0:
        os.replace(partial, path)
    comm.Barrier()
    return path


def _write_all(
    f: h5py.File,
    layouts: list[Layout],
    root_attrs: dict[str, Any],
    provenance: dict[str, Any],
    group_attrs: dict[str, dict[str, Any]],
    compress: bool,
    slabs: list[tuple[int, dict[str, Record]]],
) -> None:
    f.attrs["schema"] = SCHEMA
    f.attrs["schema_version"] = SCHEMA_VERSION
    f.attrs["complete"] = False
    _write_attrs(f, root_attrs)
    _write_attrs(f.require_group("provenance"), provenance)
    datasets = [_create(f, lay, compress) for lay in layouts]
    for group, values in sorted(group_attrs.items()):
        _write_attrs(f.require_group(group), values)
    for lay, ds in zip(layouts, datasets):
        for r, records in slabs:
            rec = records.get(lay.key)
            if rec is None:
                continue
            sel, data = _slab(lay, r, rec)
            if lay.kind == TABLE and data.shape[0] == 0:
                continue
            ds[sel] = data
    f.flush()

