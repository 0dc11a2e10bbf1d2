"""Exact order statistics of integer samples streamed in blocks, in bounded memory.

Run files can hold more samples per rank than fit in memory, and reports must still give
exact percentiles (an approximate p99.9 of noise is not worth printing). Integer samples
allow an exact radix selection: each pass over the blocks histograms the next 12..20 bits
of (value - minimum) for the candidates still undecided, so a 64-bit range needs at most a
handful of passes, each with one counter array as its only memory.

Percentiles use the inverted CDF (no interpolation): the p-th percentile is the smallest
sample x such that at least p*n samples are <= x, so every reported value is a sample.
"""

from __future__ import annotations

import math
from fractions import Fraction
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

#: Log-spaced bin edges for duration histograms, in ns: [0, 1) then 20 bins per decade to 1000 s.
LOG_EDGES_NS = np.concatenate([[0.0], np.logspace(0, 12, 12 * 20 + 1)])


@dataclass(frozen=True)
class Moments:
    """One pass worth of facts about a sample set."""

    count: int
    minimum: int
    maximum: int
    total: int

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else math.nan


@dataclass(frozen=True)
class Histogram:
    """Counts of (value - minimum) in bins of `width`: bin i holds [i*width, (i+1)*width)."""

    width: int
    counts: np.ndarray

    def log_binned(self) -> np.ndarray:
        """The same counts re-binned on `LOG_EDGES_NS` (by each bin's lower edge)."""
        nonzero = np.flatnonzero(self.counts)
        where = (
            np.searchsorted(LOG_EDGES_NS, nonzero.astype(np.float64) * self.width, side="right") - 1
        )
        return np.bincount(
            np.minimum(where, len(LOG_EDGES_NS) - 2),
            weights=self.counts[nonzero],
            minlength=len(LOG_EDGES_NS) - 1,
        ).astype(np.int64)


def order_index(q: float, n: int) -> int:
    """0-based index of the q-quantile of n sorted samples (inverted CDF)."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile {q} outside [0, 1]")
    # q as the decimal it was written as: 0.999 * 1000 must be 999, not 999.0000000000001.
    return min(n - 1, max(0, math.ceil(Fraction(repr(q)) * n) - 1))


def moments(blocks: Iterable[np.ndarray]) -> Moments | None:
    """Count, min, max and sum of integer blocks; None when there are no samples."""
    count, lo, hi, total = 0, None, None, 0
    for block in blocks:
        if block.size == 0:
            continue
        count += block.size
        bmin, bmax = int(block.min()), int(block.max())
        lo = bmin if lo is None else min(lo, bmin)
        hi = bmax if hi is None else max(hi, bmax)
        total += int(block.sum(dtype=np.int64))
    if lo is None or hi is None:
        return None
    return Moments(count, lo, hi, total)


def select(
    blocks: Callable[[], Iterable[np.ndarray]],
    m: Moments,
    indices: Sequence[int],
    bits: int | None = None,
) -> tuple[list[int], Histogram]:
    """Exact values at 0-based sorted positions `indices`, by radix passes over `blocks()`
    (called once per pass); also the histogram of the first pass, which covers all samples.

    `bits` per pass defaults to the sample count's bit length clamped to 12..20, so counters
    stay small for small sets and passes few for large ones.
    """
    if any(not 0 <= k < m.count for k in indices):
        raise ValueError(f"order statistic outside 0..{m.count - 1}")
    span_bits = int(m.maximum - m.minimum).bit_length()
    if span_bits == 0:
        return [m.minimum] * len(indices), Histogram(1, np.array([m.count], dtype=np.int64))
    bits = bits or min(20, max(12, m.count.bit_length()))
    # Per wanted position: (prefix of the value found so far, rank still to skip inside it).
    state = {k: (0, k) for k in indices}
    first: Histogram | None = None
    hi_shift = span_bits
    while hi_shift > 0:
        width = min(bits, hi_shift)
        lo_shift = hi_shift - width
        prefixes = sorted({p for p, _ in state.values()})
        hists = {p: np.zeros(1 << width, dtype=np.int64) for p in prefixes}
        for block in blocks():
            if block.size == 0:
                continue
            excess = block.astype(np.int64, copy=False) - m.minimum
            if hi_shift == span_bits:  # first pass: every sample has prefix 0
                hists[0] += np.bincount(excess >> lo_shift, minlength=1 << width)
                continue
            top = excess >> hi_shift
            digits = (excess >> lo_shift) & ((1 << width) - 1)
            for p in prefixes:
                hists[p] += np.bincount(digits[top == p], minlength=1 << width)
        if first is None:
            first = Histogram(1 << lo_shift, hists[0])
        for k, (p, skip) in state.items():
            cum = np.cumsum(hists[p])
            digit = int(np.searchsorted(cum, skip, side="right"))
            below = int(cum[digit - 1]) if digit else 0
            state[k] = ((p << width) | digit, skip - below)
        hi_shift = lo_shift
    assert first is not None
    return [m.minimum + state[k][0] for k in indices], first


def percentiles(values: np.ndarray, qs: Sequence[float]) -> list[float]:
    """Inverted-CDF percentiles of an in-memory array (NaN for an empty one)."""
    if values.size == 0:
        return [math.nan] * len(qs)
    ordered = np.sort(values, kind="stable")
    return [ordered[order_index(q, values.size)].item() for q in qs]
