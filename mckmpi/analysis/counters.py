"""Per-rank values: counters of the memory manager and the scheduler, and the scalars apps
and noise benchmarks record (`memory/*`, `scheduler/*`, `app/*`, `noise/*`).

These are scalars, one per rank, of any name the recorder chose; numbers are summarised
across ranks (min, median, max, total), strings and flags by their distinct values, so a
10^4-rank run still fits on a screen. Scalars other tables already show are left out.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from mckmpi.trace.reader import Run
from mckmpi.trace.schema import SCALAR

GROUPS = ("memory", "scheduler", "app", "noise")
#: Shown elsewhere in reports (wall time, the detour table's span and threshold).
SHOWN_ELSEWHERE = frozenset({"app/wall_ns", "noise/detour_span_ns", "noise/detour_threshold_ns"})


@dataclass
class CounterStats:
    key: str  # e.g. memory/peak
    units: str
    ranks: int
    minimum: float | None = None
    median: float | None = None
    maximum: float | None = None
    total: float | None = None
    values: str = ""  # strings and flags: "fifo x2, other x1"

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))


def _number(x: Any) -> float | int:
    return int(x) if float(x).is_integer() and abs(x) < 2**53 else float(x)


def counters(run: Run, groups: tuple[str, ...] = GROUPS) -> list[CounterStats]:
    """Every scalar dataset of `groups`, summarised across ranks."""
    out = []
    for group in groups:
        for name in run.members(group):
            key = f"{group}/{name}"
            if (
                key in SHOWN_ELSEWHERE
                or run.kind(key) != SCALAR
                or run[key].ndim != 1
                or run[key].dtype.names is not None
            ):
                continue
            values = run.scalars(key)
            if values.size == 0:
                continue
            units = run.units(key)
            if values.dtype.kind in "iuf":
                v = values.astype(np.float64)
                out.append(
                    CounterStats(
                        key,
                        units,
                        int(v.size),
                        _number(v.min()),
                        _number(np.median(v)),
                        _number(v.max()),
                        _number(v.sum()),
                    )
                )
            else:
                counts = Counter(str(x) for x in values.tolist())
                text = ", ".join(
                    f"{k} x{c}" if len(counts) > 1 or c > 1 else k for k, c in counts.most_common()
                )
                out.append(CounterStats(key, units, int(values.size), values=text))
    return out
