"""A metric over time and its noise band: what `mckmpi runs trend` computes per series of
repeats (the catalogue) and draws (plots). Plain data, no I/O."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

#: Earlier repeats needed before a point of a trend is judged.
TREND_MIN_REPEATS = 3
#: Width of the noise band in robust standard deviations (1.4826 x MAD).
TREND_SIGMAS = 3.0


@dataclass
class TrendPoint:
    created: str
    path: str
    value: float
    low: float  # the band of the earlier repeats (NaN: too few to judge)
    high: float
    flag: str  # "", "high" or "low"


@dataclass
class Trend:
    system: str
    config: str  # what makes runs repeats of each other (app, mode, shape, every option)
    label: str  # the short form: app, mode, shape, app arguments
    points: list[TrendPoint]


def band(values: list[float]) -> tuple[float, float]:
    """The noise band of repeats: median +- `TREND_SIGMAS` robust standard deviations
    (1.4826 x the median absolute deviation; at least 1% of the median when all agree)."""
    centre = statistics.median(values)
    mad = statistics.median(abs(v - centre) for v in values) * 1.4826
    half = max(TREND_SIGMAS * mad, 0.01 * abs(centre))
    return centre - half, centre + half
