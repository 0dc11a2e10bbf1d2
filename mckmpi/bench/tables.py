"""Benchmark: what netCDF-readable tables cost. Since schema version 3 a table is one
dataset per column (netCDF-C cannot show HDF5 compound datasets); version 2 stored it as one
compound dataset. An offload-calls table of 2*10^6 rows (2*10^5 with `quick`) is written
both ways in the same run, through the same layout code and compression, and read back
through the reader (`Run.read`): the whole table, and one column. Best of the rounds,
the two layouts interleaved in every round; ratios are columns / compound (the baseline).
"""

from __future__ import annotations

import pathlib
import shutil
import tempfile
import time
from typing import Any

import h5py
import numpy as np

from mckmpi.bench import write_result
from mckmpi.trace import layout
from mckmpi.trace.reader import open_run
from mckmpi.trace.schema import RANKS_DTYPE
from mckmpi.trace.tracer import Tracer

KEY = "offload/calls"


def _tracer(rows: int) -> Tracer:
    """One rank's records: its /ranks row and a calls table of `rows` rows."""
    calls = np.zeros(rows, dtype=[("call", "S16"), ("fd", "i4"), ("bytes", "i8"),
                                  ("result", "i8"), ("errno", "i4"), ("trap_ns", "i8"),
                                  ("done_ns", "i8"), ("how", "u1")])
    rng = np.random.default_rng(1)
    calls["call"] = np.array([b"pwrite64", b"pread64", b"openat", b"fstat"])[rng.integers(0, 4, rows)]
    calls["fd"] = rng.integers(1000, 1064, rows)
    calls["bytes"] = calls["result"] = rng.integers(0, 1 << 20, rows)
    calls["trap_ns"] = np.cumsum(rng.integers(1000, 20000, rows))
    calls["done_ns"] = calls["trap_ns"] + rng.integers(2000, 50000, rows)
    t = Tracer()
    t.scalar("", "ranks", np.zeros((), dtype=RANKS_DTYPE))
    t.table("offload", "calls", calls)
    return t


def _write(path: pathlib.Path, tracer: Tracer, compound: bool) -> None:
    """One rank's run file through `layout`; `compound`: the table as version 2 laid it out."""
    layouts = layout.merge([layout.manifest(tracer.records)])
    records = layout.current(tracer.records)
    with h5py.File(path, "w") as f:
        plain = [lay for lay in layouts if not (compound and lay.key == KEY)]
        datasets = layout.write_header(f, plain, {"world_size": 1}, {}, {}, compress=True)
        layout.write_records(plain, datasets, 0, records)
        if compound:
            (lay,) = [lay for lay in layouts if lay.key == KEY]
            rows = np.empty(lay.shape, dtype=lay.dtype)
            rows["rank"] = 0
            for name in records[KEY].dtype.names:
                rows[name] = records[KEY][name]
            ds = f.create_dataset(KEY, data=rows, chunks=True, compression="gzip",
                                  compression_opts=1, shuffle=True)
            ds.attrs["kind"] = lay.kind
            f.attrs["schema_version"] = 2
        layout.write_attrs(f, {"complete": True})


def _read(path: pathlib.Path, column: bool) -> int:
    with open_run(path) as run:
        return len(run.read(KEY, "trap_ns") if column else run.read(KEY))


def _timed(action: Any, *args: Any) -> float:
    t0 = time.perf_counter()
    action(*args)
    return time.perf_counter() - t0


def run(out_dir: pathlib.Path, quick: bool = False) -> dict:
    """Write and read the table both ways; write bench-tables.json."""
    rows = 200_000 if quick else 2_000_000
    rounds = 3 if quick else 5
    tracer = _tracer(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench-tables-", dir=out_dir))
    best: dict[str, dict[str, float]] = {side: {"write_s": np.inf, "read_table_s": np.inf,
                                                "read_column_s": np.inf}
                                         for side in ("columns", "compound")}
    size: dict[str, int] = {}
    try:
        for r in range(rounds):
            for side in ("columns", "compound") if r % 2 == 0 else ("compound", "columns"):
                path = work / f"{side}-{r}.h5"
                b = best[side]
                b["write_s"] = min(b["write_s"], _timed(_write, path, tracer, side == "compound"))
                for what, column in (("read_table_s", False), ("read_column_s", True)):
                    b[what] = min(b[what], _timed(_read, path, column))
                size[side] = path.stat().st_size
                if _read(path, False) != rows:
                    raise RuntimeError(f"tables bench: {path} does not hold {rows} rows")
                path.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "benchmark": "tables",
        "quick": quick,
        "rows": rows,
        "rounds": rounds,
        "columns": {**best["columns"], "file_bytes": size["columns"]},
        "baseline_compound": {**best["compound"], "file_bytes": size["compound"]},
        "ratio": {k: best["columns"][k] / best["compound"][k] for k in best["columns"]}
        | {"file_bytes": size["columns"] / size["compound"]},
    }
    write_result(out_dir, "tables", result)
    return result
