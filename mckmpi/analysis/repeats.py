"""Repeats of one study point: the median and a 95% confidence interval per metric.

A point run K times gives K values of each metric. The median says what a run typically
gives; the interval says how far the typical value may be from it given the spread of the
repeats, so a change between two studies can be told from noise. The interval is
Student's t interval of the mean, mean +- t(0.975, K-1) s / sqrt(K): with the handful of
repeats a study affords (3-10), a bootstrap of the median only returns the extreme values
and a distribution-free interval for the median does not reach 95% below K = 6. It needs
K >= 2; one run has no interval (NaN bounds).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: The method, as study files and reports name it.
CI_METHOD = "student-t 95% interval of the mean"

#: t(0.975, df) for df = 1..30; beyond, the Cornish-Fisher expansion around z is within 1e-3.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
_Z975 = 1.959964


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with `df` degrees of freedom."""
    if df < 1:
        raise ValueError(f"t quantile needs df >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass(frozen=True)
class Interval:
    """A metric over the repeats of one point."""

    n: int
    median: float
    mean: float
    low: float   # 95% interval of the mean (NaN for n < 2)
    high: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def to_json(self) -> dict[str, float | int]:
        return {"n": self.n, "median": self.median, "mean": self.mean, "ci_low": self.low,
                "ci_high": self.high}


def interval(values: Sequence[float] | np.ndarray) -> Interval:
    """Median and 95% t interval of the finite values (NaN everywhere when there are none)."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return Interval(0, math.nan, math.nan, math.nan, math.nan)
    mean, median = float(x.mean()), float(np.median(x))
    if x.size < 2:
        return Interval(1, median, mean, math.nan, math.nan)
    half = t975(x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return Interval(int(x.size), median, mean, mean - half, mean + half)
