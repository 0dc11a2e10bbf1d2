"""Writing one run file per job from the tracers of all ranks.

Every rank first shares a small manifest of what it recorded (names, kinds, dtypes,
shapes); from the merged manifest all ranks derive the same layout, which is what parallel
HDF5 needs: every rank creates the same datasets in the same order, then writes only its
own slice (`driver="mpio"`). Without MPI support in h5py, or when asked, the data is
gathered to rank 0, which writes the same layout alone.

The file is created as ``NAME.partial`` with ``complete = False``, flipped to True after the
last byte, closed, and only then renamed: a job killed while writing leaves a file that
says it is incomplete, never one that looks complete.

Memory stays bounded for large traces (10^8 samples): arrays are chunked one rank per chunk
row, so a rank's data is written (and later read) without touching other ranks' chunks;
data is written in blocks of at most `WRITE_BLOCK` bytes, so writing copies no more than
one block of a record (a parallel writer's record may even be a `numpy.memmap`); the single
writer receives one rank's records at a time instead of gathering the whole job into rank 0.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from mckmpi.trace.schema import ARRAY, PARTIAL_SUFFIX, SCHEMA, SCHEMA_VERSION, TABLE
from mckmpi.trace.tracer import Record, Tracer

if TYPE_CHECKING:
    from mpi4py import MPI

#: Datasets above this size are chunked (and compressed when one writer writes them).
CHUNK_THRESHOLD = 1 << 20
#: Target size of one chunk of a per-rank array.
CHUNK_BYTES = 1 << 20
#: Largest slice of one record handed to HDF5 in one write call.
WRITE_BLOCK = 64 << 20
#: Message tag of the single writer's rank-by-rank collection.
GATHER_TAG = 0x6D636C


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
        kwargs["chunks"] = _chunks(lay)
        if compress:
            kwargs.update(compression="gzip", compression_opts=1, shuffle=True)
    if lay.kind != TABLE and lay.dtype.kind == "f":
        kwargs["fillvalue"] = np.nan
    ds = f.create_dataset(lay.key, shape=lay.shape, dtype=lay.dtype, **kwargs)
    ds.attrs["kind"] = lay.kind
    for field, unit in lay.units.items():
        ds.attrs["units" if not field else f"units:{field}"] = unit
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


def _write_record(ds: h5py.Dataset, lay: Layout, rank: int, rec: Record) -> None:
    """This rank's part of one dataset, in bounded blocks."""
    data = rec.data
    if lay.kind == TABLE:
        first = lay.offsets[rank]
        for a, b in _blocks(data.shape[0], lay.dtype.itemsize, 1):
            rows = np.empty(b - a, dtype=lay.dtype)
            rows["rank"] = rank
            for name in data.dtype.names:
                rows[name] = data[name][a:b]
            ds[first + a:first + b] = rows
        return
    if lay.kind != ARRAY or data.ndim == 0:
        ds[rank] = data
        return
    chunks = ds.chunks
    align = chunks[1] if chunks else 1
    row_bytes = int(np.prod(data.shape[1:])) * data.dtype.itemsize
    for a, b in _blocks(data.shape[0], row_bytes, align):
        ds[rank, a:b] = data[a:b]


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
            datasets = _write_header(f, layouts, root_attrs, provenance, group_attrs,
                                     compress=False)
            _write_records(layouts, datasets, rank, tracer.records)
            f.flush()
            comm.Barrier()
            f.attrs["complete"] = True
    elif rank == 0:
        with h5py.File(partial, "w") as f:
            datasets = _write_header(f, layouts, root_attrs, provenance, group_attrs, compress=True)
            _write_records(layouts, datasets, 0, tracer.records)
            for peer in range(1, size):
                # One rank's records in memory at a time: ask, receive, write, drop.
                comm.send(None, dest=peer, tag=GATHER_TAG)
                _write_records(layouts, datasets, peer, comm.recv(source=peer, tag=GATHER_TAG))
            f.flush()
            f.attrs["complete"] = True
    else:
        comm.recv(source=0, tag=GATHER_TAG)
        comm.send(tracer.records, dest=0, tag=GATHER_TAG)
    comm.Barrier()
    if rank == 0:
        os.replace(partial, path)
    comm.Barrier()
    return path


def _write_header(
    f: h5py.File,
    layouts: list[Layout],
    root_attrs: dict[str, Any],
    provenance: dict[str, Any],
    group_attrs: dict[str, dict[str, Any]],
    compress: bool,
) -> list[h5py.Dataset]:
    """Attributes and every dataset, created empty (collectively when parallel)."""
    f.attrs["schema"] = SCHEMA
    f.attrs["schema_version"] = SCHEMA_VERSION
    f.attrs["complete"] = False
    _write_attrs(f, root_attrs)
    _write_attrs(f.require_group("provenance"), provenance)
    datasets = [_create(f, lay, compress) for lay in layouts]
    for group, values in sorted(group_attrs.items()):
        _write_attrs(f.require_group(group), values)
    return datasets


def _write_records(layouts: list[Layout], datasets: list[h5py.Dataset], rank: int,
                   records: dict[str, Record]) -> None:
    for lay, ds in zip(layouts, datasets):
        rec = records.get(lay.key)
        if rec is not None and not (lay.kind == TABLE and rec.data.shape[0] == 0):
            _write_record(ds, lay, rank, rec)

