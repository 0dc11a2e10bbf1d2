"""What a mini-app recorded: per-iteration times, compute/communication split, wall time.

A bulk-synchronous iteration ends when its slowest rank ends, so the iteration time of the
job is the maximum over ranks of `app/iter_ns[:, i]`; its median over iterations is the
per-iteration time of scaling studies. Iterations are streamed in column blocks. Other
[ranks, n] time arrays of the app (halo waits, checkpoint times, ...) are summarised over
all their values with exact percentiles.

The problem size is the `global_size` attribute: a number, or a shape such as "256x256"
(its product is the element count scaling studies use).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mckmpi.analysis.stats import moments, order_index, percentiles, select
from mckmpi.trace.reader import BLOCK_ELEMENTS, Run, RunFileError

ITER, COMPUTE, COMM, WALL = "app/iter_ns", "app/compute_ns", "app/comm_ns", "app/wall_ns"
ALLREDUCE = "app/allreduce"
_SHAPE = re.compile(r"^\s*\d+(\s*x\s*\d+)*\s*$")


@dataclass
class TimeArray:
    """Exact statistics of every value of one [ranks, n] time array."""

    key: str
    count: int
    p50_ns: int
    p99_ns: int
    max_ns: int
    mean_ns: float

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class AppStats:
    name: str
    scaling: str
    size: str  # global_size as recorded ("" when absent)
    global_size: int | None  # its element count
    verified: bool | None
    ranks: int
    wall_ns: int | None  # slowest rank's wall time
    attrs: dict[str, Any] = field(default_factory=dict)
    iterations: int = 0
    iter_p50_ns: float = math.nan  # per-iteration time (max over ranks), percentiles
    iter_mean_ns: float = math.nan
    iter_p99_ns: float = math.nan
    iter_max_ns: float = math.nan
    compute_share: float = math.nan  # sum(compute) / sum(iteration) over ranks and iterations
    comm_share: float = math.nan
    arrays: list[TimeArray] = field(default_factory=list)
    allreduce: list[TimeArray] = field(default_factory=list)  # per message size (key: "N B")
    per_iteration_max: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    per_iteration_median: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    per_iteration_min: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in vars(self).items() if not k.startswith("per_iteration")}
        out["arrays"] = [a.to_json() for a in self.arrays]
        out["allreduce"] = [a.to_json() for a in self.allreduce]
        return out


def elements(size: Any) -> int | None:
    """Element count of a problem size: 4096 -> 4096, '64x64' -> 4096, else None."""
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        return int(size)
    if isinstance(size, str) and _SHAPE.match(size):
        return math.prod(int(p) for p in size.split("x"))
    return None


def _column_sums(run: Run, key: str, block: int) -> float:
    if key not in run:
        return math.nan
    ds = run[key]
    step = max(1, block // max(1, ds.shape[0]))
    return float(
        sum(
            run.read(key, (slice(None), slice(a, a + step))).sum(dtype=np.float64)
            for a in range(0, ds.shape[1], step)
        )
    )


def _time_array(run: Run, key: str, block: int) -> TimeArray | None:
    ranks = run[key].shape[0]

    def blocks():
        return (
            b.astype(np.int64, copy=False)
            for r in range(ranks)
            for b in run.rank_blocks(key, r, block)
        )

    m = moments(blocks())
    if m is None:
        return None
    values, _ = select(blocks, m, [order_index(q, m.count) for q in (0.5, 0.99)])
    return TimeArray(key, m.count, values[0], values[1], m.maximum, m.mean)


def _allreduce(run: Run) -> list[TimeArray]:
    """Latency of every timed allreduce call of every rank, per message size."""
    names = set(run[ALLREDUCE].dtype.names or ())
    if not {"bytes", "ns"} <= names:
        raise RunFileError(f"{run.path}: {ALLREDUCE!r} needs bytes and ns columns")
    rows = run.table(ALLREDUCE)
    out = []
    for size in np.unique(rows["bytes"]):
        ns = np.sort(rows["ns"][rows["bytes"] == size].astype(np.int64))
        p50, p99 = (int(ns[order_index(q, ns.size)]) for q in (0.5, 0.99))
        out.append(
            TimeArray(f"{int(size)} B", int(ns.size), p50, p99, int(ns[-1]), float(ns.mean()))
        )
    return out


def _iterations(run: Run, stats: AppStats, block: int) -> None:
    ranks, n = run[ITER].shape
    if ranks == 0 or n == 0:
        return
    step = max(1, block // ranks)
    hi, mid, lo = np.empty(n), np.empty(n), np.empty(n)
    total = 0.0
    for a in range(0, n, step):
        cols = run.read(ITER, (slice(None), slice(a, a + step))).astype(np.float64)
        hi[a : a + step], mid[a : a + step], lo[a : a + step] = (
            cols.max(0),
            np.median(cols, 0),
            cols.min(0),
        )
        total += cols.sum()
    stats.iterations = n
    stats.iter_p50_ns, stats.iter_p99_ns, stats.iter_max_ns = percentiles(hi, (0.5, 0.99, 1.0))
    stats.iter_mean_ns = float(hi.mean())
    if total > 0:
        stats.compute_share = _column_sums(run, COMPUTE, block) / total
        stats.comm_share = _column_sums(run, COMM, block) / total
    stats.per_iteration_max, stats.per_iteration_median, stats.per_iteration_min = hi, mid, lo


def app(run: Run, block: int = BLOCK_ELEMENTS) -> AppStats | None:
    """App figures, or None when the run recorded nothing under /app."""
    attrs = run.group_attrs("app")
    if not attrs and not run.members("app"):
        return None
    wall = int(run.read(WALL).max()) if WALL in run and run[WALL].shape[0] else None
    name = str(attrs.get("name") or Path(str(run.attrs.get("app") or "")).name.removesuffix(".py"))
    size = attrs.get("global_size")
    verified = attrs.get("verified")
    stats = AppStats(
        name,
        str(attrs.get("scaling", "")),
        "" if size is None else str(size),
        elements(size),
        bool(verified) if verified is not None else None,
        run.world_size,
        wall,
        attrs,
    )
    if ALLREDUCE in run:
        stats.allreduce = _allreduce(run)
    if ITER in run:
        _iterations(run, stats, block)
    for name in run.members("app"):
        key = f"app/{name}"
        ds = run[key]
        if (
            key in (ITER, COMPUTE, COMM)
            or ds.ndim != 2
            or ds.dtype.kind not in "iu"
            or run.units(key) != "ns"
        ):
            continue
        summary = _time_array(run, key, block)
        if summary is not None:
            stats.arrays.append(summary)
    return stats
