"""Speedup and parallel efficiency of a set of runs of one app (strong and weak scaling).

Runs form a scaling series when they share the app, the mode, the scaling kind and the
problem: the same global size for strong scaling, the same size per rank for weak scaling
(runs without a `scaling` attribute count as strong scaling of their global size). Within a
series the run with the fewest ranks P0 is the baseline, time T is the per-iteration time
(median over iterations of the slowest rank), else the wall time, and repeated runs of one
configuration count with their median time:

    strong:  speedup S = T0 / T,           efficiency E = S / (P / P0)
    weak:    efficiency E = T0 / T,        scaled speedup S = E * P / P0
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

WEAK, STRONG = "weak", "strong"


@dataclass
class Curve:
    """One series: sorted rank counts with their time, speedup and efficiency."""

    app: str
    mode: str
    scaling: str
    problem: str  # "global size N" / "N per rank" / "size unknown"
    ranks: np.ndarray
    time_s: np.ndarray
    speedup: np.ndarray
    efficiency: np.ndarray
    runs: np.ndarray  # repeats per point


def _s(v: object) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


def run_time(row: np.void) -> float:
    """Seconds per iteration, else wall seconds (NaN when neither is known)."""
    t = float(row["iter_us"]) / 1e6
    return t if math.isfinite(t) and t > 0 else float(row["wall_s"])


def series_key(row: np.void) -> tuple[str, str, str, str]:
    scaling = _s(row["scaling"]) or STRONG
    size = int(row["global_size"])
    if scaling == WEAK and size >= 0:
        problem = f"{size / max(1, int(row['ranks'])):g} per rank"
    elif _s(row["size"]) or size >= 0:
        problem = f"global size {_s(row['size']) or size}"
    else:
        problem = "size unknown"
    return _s(row["app"]), _s(row["mode"]), scaling, problem


def is_complete(row: np.void) -> bool:
    """Whether a study row is a complete run (partial runs never count as repeats)."""
    return "complete" not in (row.dtype.names or ()) or bool(row["complete"])


def curves(rows: np.ndarray) -> list[Curve]:
    """Every scaling series in `rows` (a study table), with at least one point each."""
    groups: dict[tuple[str, str, str, str], dict[int, list[float]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for row in rows:
        t = run_time(row)
        if math.isfinite(t) and t > 0 and is_complete(row):
            groups[series_key(row)][int(row["ranks"])].append(t)
    out = []
    for (app, mode, scaling, problem), points in sorted(groups.items()):
        ranks = np.array(sorted(points))
        times = np.array([float(np.median(points[p])) for p in ranks])
        rel = ranks / ranks[0]
        if scaling == WEAK:
            eff = times[0] / times
            speedup = eff * rel
        else:
            speedup = times[0] / times
            eff = speedup / rel
        out.append(
            Curve(
                app,
                mode,
                scaling,
                problem,
                ranks,
                times,
                speedup,
                eff,
                np.array([len(points[p]) for p in ranks]),
            )
        )
    return out


def apply(rows: np.ndarray) -> None:
    """Fill the `speedup`, `efficiency` and `baseline_ranks` columns of a study table."""
    by_key = {(c.app, c.mode, c.scaling, c.problem): c for c in curves(rows)}
    for i, row in enumerate(rows):
        c = by_key.get(series_key(row))
        t = run_time(row)
        if c is None or not (math.isfinite(t) and t > 0) or not is_complete(row):
            rows["speedup"][i] = rows["efficiency"][i] = math.nan
            rows["baseline_ranks"][i] = 0
            continue
        rel = int(row["ranks"]) / int(c.ranks[0])
        if c.scaling == WEAK:
            rows["efficiency"][i] = c.time_s[0] / t
            rows["speedup"][i] = rows["efficiency"][i] * rel
        else:
            rows["speedup"][i] = c.time_s[0] / t
            rows["efficiency"][i] = rows["speedup"][i] / rel
        rows["baseline_ranks"][i] = int(c.ranks[0])
