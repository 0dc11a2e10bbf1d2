"""Per-rank noise statistics of a run: FWQ samples, FTQ counts and selfish-detour events.

FWQ excess (what `report` and `compare` print): for rank r with samples x_1..x_n (ns),
m_r = min_i x_i is the rank's noise-free quantum, the best the core ever did, and
e_i = x_i - m_r >= 0 the time sample i lost to noise. Percentiles of e are exact inverted-CDF
values (`mckmpi.analysis.stats`); the noise fraction is sum(e) / sum(x), the share of the
rank's time lost. A row of zeros is a rank that did not record samples.

Everything is computed per rank and streamed in blocks, so a file with 10^8 samples needs
one block of memory per pass, never the whole dataset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mckmpi.analysis.stats import LOG_EDGES_NS, Moments, moments, order_index, percentiles, select
from mckmpi.trace.reader import BLOCK_ELEMENTS, Run, RunFileError

FWQ = "noise/fwq_ns"
FTQ_COUNTS = "noise/ftq_counts"
DETOURS = "noise/detours"
QUANTILES = (0.5, 0.99, 0.999)
#: Points of the per-rank FWQ time series kept for plots (min and max per bin).
ENVELOPE_BINS = 2000


@dataclass
class Envelope:
    """FWQ samples over time, reduced to `ENVELOPE_BINS` bins: min and max sample per bin,
    at the bin's mid-time (time since the rank's first sample: the samples run back to back)."""

    time_s: np.ndarray
    low_ns: np.ndarray
    high_ns: np.ndarray


@dataclass
class FwqRank:
    rank: int
    samples: int
    quantum_ns: int = 0  # m_r, the smallest sample
    p50_ns: int = 0  # excess percentiles (see the module docstring)
    p99_ns: int = 0
    p999_ns: int = 0
    max_ns: int = 0
    mean_ns: float = math.nan  # mean excess
    noise_fraction: float = math.nan
    envelope: Envelope | None = field(default=None, repr=False)
    histogram: np.ndarray | None = field(default=None, repr=False)  # excess on LOG_EDGES_NS

    def to_json(self) -> dict[str, Any]:
        return {
            k: getattr(self, k)
            for k in (
                "rank",
                "samples",
                "quantum_ns",
                "p50_ns",
                "p99_ns",
                "p999_ns",
                "max_ns",
                "mean_ns",
                "noise_fraction",
            )
        }


@dataclass
class FtqRank:
    rank: int
    intervals: int
    max_count: int = 0
    mean_count: float = math.nan
    min_count: int = 0
    noise_fraction: float = math.nan  # 1 - mean/max: work lost against the best interval

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class DetourRank:
    rank: int
    count: int
    span_ns: int
    total_ns: int
    fraction: float  # total detour time / measured span
    rate_hz: float  # detours per second of span
    p50_ns: float
    p99_ns: float
    max_ns: float
    threshold_ns: float = math.nan

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))


class _EnvelopeBuilder:
    def __init__(self, n: int) -> None:
        bins = min(n, ENVELOPE_BINS)
        self.bounds = np.arange(bins + 1, dtype=np.int64) * n // bins
        self.low = np.full(bins, np.iinfo(np.int64).max, dtype=np.int64)
        self.high = np.zeros(bins, dtype=np.int64)
        self.sums = np.zeros(bins, dtype=np.int64)

    def add(self, offset: int, block: np.ndarray) -> None:
        i0 = int(np.searchsorted(self.bounds, offset, side="right")) - 1
        i1 = int(np.searchsorted(self.bounds, offset + block.size, side="left"))
        starts = np.maximum(self.bounds[i0:i1], offset) - offset
        self.low[i0:i1] = np.minimum(self.low[i0:i1], np.minimum.reduceat(block, starts))
        self.high[i0:i1] = np.maximum(self.high[i0:i1], np.maximum.reduceat(block, starts))
        self.sums[i0:i1] += np.add.reduceat(block, starts)

    def result(self) -> Envelope:
        ends = np.cumsum(self.sums)
        return Envelope((ends - self.sums / 2) / 1e9, self.low, self.high)


def fwq_rank(run: Run, rank: int, block: int = BLOCK_ELEMENTS) -> FwqRank:
    """Excess statistics, envelope and histogram of one rank, in two or three passes."""
    n = run.length(FWQ, rank)
    if n == 0:
        return FwqRank(rank, 0)
    env = _EnvelopeBuilder(n)
    lo, hi, total, offset = None, None, 0, 0
    for b in run.rank_blocks(FWQ, rank, block):
        b = b.astype(np.int64, copy=False)
        bmin, bmax = int(b.min()), int(b.max())
        lo = bmin if lo is None else min(lo, bmin)
        hi = bmax if hi is None else max(hi, bmax)
        total += int(b.sum(dtype=np.int64))
        env.add(offset, b)
        offset += b.size
    if lo is None or hi is None or hi <= 0:
        return FwqRank(rank, 0)
    m = Moments(n, lo, hi, total)
    values, hist = select(
        lambda: run.rank_blocks(FWQ, rank, block), m, [order_index(q, n) for q in QUANTILES]
    )
    excess_total = total - n * lo
    return FwqRank(
        rank,
        n,
        lo,
        *(v - lo for v in values),
        hi - lo,
        excess_total / n,
        excess_total / total,
        env.result(),
        hist.log_binned(),
    )


def fwq(run: Run, block: int = BLOCK_ELEMENTS) -> list[FwqRank]:
    """FWQ statistics of every rank (empty when the run has no FWQ samples)."""
    if FWQ not in run:
        return []
    return [fwq_rank(run, r, block) for r in range(run[FWQ].shape[0])]


def ftq(run: Run, block: int = BLOCK_ELEMENTS) -> list[FtqRank]:
    """FTQ work counts per rank: the best interval is the quiet reference."""
    if FTQ_COUNTS not in run:
        return []
    out = []
    for r in range(run[FTQ_COUNTS].shape[0]):
        m = moments(run.rank_blocks(FTQ_COUNTS, r, block))
        if m is None or m.maximum <= 0:
            out.append(FtqRank(r, 0))
            continue
        out.append(FtqRank(r, m.count, m.maximum, m.mean, m.minimum, 1.0 - m.mean / m.maximum))
    return out


def _per_rank_scalar(run: Run, key: str, size: int) -> np.ndarray:
    if key not in run:
        return np.full(size, math.nan)
    values = run.read(key).astype(np.float64)
    return values if values.shape == (size,) else np.full(size, math.nan)


def detours(run: Run) -> list[DetourRank]:
    """Detour events per rank; the fraction is against each rank's measured span."""
    if DETOURS not in run:
        return []
    fields = run[DETOURS].dtype.names or ()
    if not {"start_ns", "duration_ns"} <= set(fields):
        raise RunFileError(f"{run.path}: {DETOURS!r} needs start_ns and duration_ns columns")
    size = len(run.row_offsets(DETOURS)) - 1
    spans = _per_rank_scalar(run, "noise/detour_span_ns", size)
    thresholds = _per_rank_scalar(run, "noise/detour_threshold_ns", size)
    out = []
    for r in range(size):
        durations = run.table(DETOURS, r)["duration_ns"].astype(np.int64)
        total = int(durations.sum())
        span = spans[r]
        p50, p99, pmax = percentiles(durations, (0.5, 0.99, 1.0))
        out.append(
            DetourRank(
                r,
                int(durations.size),
                int(span) if math.isfinite(span) else 0,
                total,
                total / span if math.isfinite(span) and span > 0 else math.nan,
                durations.size / (span / 1e9) if math.isfinite(span) and span > 0 else math.nan,
                p50,
                p99,
                pmax,
                thresholds[r],
            )
        )
    return out


def detour_histogram(run: Run) -> np.ndarray:
    """All ranks' detour durations counted on `LOG_EDGES_NS` (for plots)."""
    counts = np.zeros(len(LOG_EDGES_NS) - 1, dtype=np.int64)
    if DETOURS not in run:
        return counts
    offsets = run.row_offsets(DETOURS)
    for r in range(len(offsets) - 1):
        d = run.table(DETOURS, r)["duration_ns"].astype(np.float64)
        counts += np.histogram(d, bins=LOG_EDGES_NS)[0]
    return counts
