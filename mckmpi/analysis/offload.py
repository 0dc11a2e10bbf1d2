"""Offloaded system calls of a run: count, bytes, errors and latency per call.

Latency is the proxy's round trip as the rank saw it: completion minus trap time
(`done_ns - trap_ns`), which includes the trap into the kernel, the notification, the
proxy's work and the reply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mckmpi.analysis.stats import percentiles
from mckmpi.trace.reader import Run, RunFileError

CALLS = "offload/calls"
_NEEDED = {"call", "bytes", "result", "errno", "trap_ns", "done_ns"}


@dataclass
class CallStats:
    call: str
    count: int
    ranks: int
    bytes: int
    errors: int
    p50_ns: float
    p99_ns: float
    max_ns: float
    mean_ns: float
    latencies_ns: np.ndarray = field(repr=False)  # sorted, for CDF plots

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k != "latencies_ns"}


def calls(run: Run) -> list[CallStats]:
    """One row per system call name, most frequent first; ``[]`` without offload data."""
    if CALLS not in run:
        return []
    names = set(run[CALLS].dtype.names or ())
    if not _NEEDED <= names:
        raise RunFileError(f"{run.path}: {CALLS!r} lacks columns {sorted(_NEEDED - names)}")
    table = run.table(CALLS)
    if table.size == 0:
        return []
    call_names = np.char.decode(table["call"].astype("S"), errors="replace")
    latency = (table["done_ns"] - table["trap_ns"]).astype(np.int64)
    out = []
    for name in np.unique(call_names):
        sel = call_names == name
        lat = np.sort(latency[sel])
        p50, p99, pmax = percentiles(lat, (0.5, 0.99, 1.0))
        out.append(
            CallStats(
                str(name),
                int(sel.sum()),
                int(np.unique(table["rank"][sel]).size),
                int(np.clip(table["bytes"][sel], 0, None).sum()),
                int((table["errno"][sel] != 0).sum()),
                p50,
                p99,
                pmax,
                float(lat.mean()) if lat.size else math.nan,
                lat,
            )
        )
    out.sort(key=lambda c: (-c.count, c.call))
    return out
