"""Speedup and parallel efficiency of a set of runs of one app (strong and weak scaling).

Runs form a scaling series when they share the app, the mode, the scaling kind, the
problem (the same global size for strong scaling, the same size per rank for weak scaling;
runs without a `scaling` attribute count as strong scaling of their global size) and the
values of the study's other axes. Time T is the per-iteration time (median over iterations
of the slowest rank), else the wall time, and repeated runs of one configuration count
with their median time. All modes of one problem share one baseline, so their curves can
be compared: the linux mode's run with the fewest ranks P0 (the job as users run it today),
else the series' own fewest ranks:

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
    time_s: np.ndarray  # median over the repeats
    speedup: np.ndarray
    efficiency: np.ndarray
    runs: np.ndarray  # repeats per point
    axes: str = ""
    ci_low_s: np.ndarray | None = None  # 95% interval of the time (NaN with one repeat)
    ci_high_s: np.ndarray | None = None
    baseline_mode: str = ""
    baseline_ranks: int = 0
    baseline_s: float = math.nan


def _s(v: object) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


def run_time(row: np.void) -> float:
    """Seconds per iteration, else wall seconds (NaN when neither is known)."""
    t = float(row["iter_us"]) / 1e6
    return t if math.isfinite(t) and t > 0 else float(row["wall_s"])


def scales(row: np.void) -> bool:
    """Whether a run belongs on a scaling curve: a scaling study, or an app that times its
    iterations. A noise survey's wall time is how long it chose to measure, not a speed."""
    return bool(_s(row["scaling"])) or (math.isfinite(float(row["iter_us"]))
                                        and float(row["iter_us"]) > 0)


def series_key(row: np.void) -> tuple[str, str, str, str, str]:
    scaling = _s(row["scaling"]) or STRONG
    size = int(row["global_size"])
    if scaling == WEAK and size >= 0:
        problem = f"{size / max(1, int(row['ranks'])):g} per rank"
    elif _s(row["size"]) or size >= 0:
        problem = f"global size {_s(row['size']) or size}"
    else:
        problem = "size unknown"
    axes = _s(row["axes"]) if "axes" in (row.dtype.names or ()) else ""
    return _s(row["app"]), _s(row["mode"]), scaling, problem, axes


def _gains(scaling: str, base_s: float, base_ranks: int, t: float, ranks: int) -> tuple[float, float]:
    """(speedup, efficiency) of time `t` at `ranks` against the baseline."""
    rel = ranks / base_ranks
    if scaling == WEAK:
        eff = base_s / t
        return eff * rel, eff
    speedup = base_s / t
    return speedup, speedup / rel


def is_complete(row: np.void) -> bool:
    """Whether a study row is a complete run (partial runs never count as repeats)."""
    return "complete" not in (row.dtype.names or ()) or bool(row["complete"])


def curves(rows: np.ndarray) -> list[Curve]:
    """Every scaling series in `rows` (a study table), with at least one point each."""
    from mckmpi.analysis.repeats import interval

    groups: dict[tuple[str, str, str, str, str], dict[int, list[float]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for row in rows:
        t = run_time(row)
        if math.isfinite(t) and t > 0 and scales(row) and is_complete(row):
            groups[series_key(row)][int(row["ranks"])].append(t)
    out = []
    for (app, mode, scaling, problem, axes), points in sorted(groups.items()):
        ranks = np.array(sorted(points))
        ivs = [interval(points[p]) for p in ranks]
        out.append(
            Curve(app, mode, scaling, problem, ranks, np.array([iv.median for iv in ivs]),
                  np.zeros(len(ranks)), np.zeros(len(ranks)),
                  np.array([len(points[p]) for p in ranks]), axes,
                  np.array([iv.low for iv in ivs]), np.array([iv.high for iv in ivs]))
        )
    for c in out:
        # One baseline per problem: linux mode's fewest ranks, else the curve's own.
        peers = [o for o in out if (o.app, o.scaling, o.problem, o.axes)
                 == (c.app, c.scaling, c.problem, c.axes)]
        base = next((o for o in peers if o.mode == "linux"), c)
        c.baseline_mode, c.baseline_ranks = base.mode, int(base.ranks[0])
        c.baseline_s = float(base.time_s[0])
        for i, (p, t) in enumerate(zip(c.ranks, c.time_s)):
            c.speedup[i], c.efficiency[i] = _gains(c.scaling, c.baseline_s, c.baseline_ranks,
                                                   float(t), int(p))
    return out


def apply(rows: np.ndarray) -> None:
    """Fill the `speedup`, `efficiency`, `baseline_ranks` and `baseline_mode` columns of a
    study table."""
    by_key = {(c.app, c.mode, c.scaling, c.problem, c.axes): c for c in curves(rows)}
    for i, row in enumerate(rows):
        c = by_key.get(series_key(row))
        t = run_time(row)
        if c is None or not (math.isfinite(t) and t > 0) or not is_complete(row):
            rows["speedup"][i] = rows["efficiency"][i] = math.nan
            rows["baseline_ranks"][i] = 0
            continue
        rows["speedup"][i], rows["efficiency"][i] = _gains(
            c.scaling, c.baseline_s, c.baseline_ranks, t, int(row["ranks"]))
        rows["baseline_ranks"][i] = c.baseline_ranks
        rows["baseline_mode"][i] = c.baseline_mode.encode()
