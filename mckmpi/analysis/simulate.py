"""`mckmpi simulate`: predicted noise amplification of a bulk-synchronous app at scale.

Model: every iteration each of P ranks computes W of work, then all synchronise (a
collective), so the iteration takes W + max_i D_i, D_i being the noise rank i suffered
while computing. The D_i are iid draws from the empirical distribution of the noise one
window of W suffered on the measured cores (every rank of the trace is one core's sample;
all are pooled). The maximum of P iid draws has CDF F(x)^P, so it is drawn exactly, without
simulating ranks, as F^-1(U^(1/P)), U uniform; its expectation is exact as well:
E[max] = sum_i v_i ((C_i/n)^P - (C_(i-1)/n)^P) over the sorted distinct values v_i with
cumulative counts C_i. The predicted slowdown is (W + E[max]) / W.

Noise of one window, by source:
- FWQ samples: a window is k = max(1, round(W / q)) consecutive quanta (q: the median over
  ranks of the noise-free quantum) and its noise the sum of their excesses (sliding windows
  over each rank's samples, thinned by a stride when there are more than `max_windows`).
- detour events: work W started at t ends at x = F^-1(F(t) + W), where F(t) = t minus the
  detour time before t (the time the core was free); the noise is x - t - W, for starts on
  a regular grid over each rank's measured span (windows that would end past it are dropped).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mckmpi.analysis.noise import DETOURS, FWQ
from mckmpi.analysis.report import fmt, num
from mckmpi.analysis.stats import moments, order_index
from mckmpi.errors import UsageError
from mckmpi.trace.reader import BLOCK_ELEMENTS, Run, RunFileError
from mckmpi.utility.table import counted, render

#: Upper bound on the noise windows kept from a trace (all ranks), to bound memory.
MAX_WINDOWS = 10_000_000
#: Window starts per window length on the detour grid (finer than any detour's footprint).
GRID_PER_WINDOW = 20
SPAN = "noise/detour_span_ns"


@dataclass
class NoiseDistribution:
    """The empirical distribution of the noise of one window: sorted distinct values (ns)
    with cumulative counts."""

    values: np.ndarray
    cumulative: np.ndarray
    source: str
    window_ns: float
    ranks: int
    independent: int  # non-overlapping windows the trace holds (its real sample size)
    note: str = ""

    @classmethod
    def from_samples(
        cls,
        samples: np.ndarray,
        source: str,
        window_ns: float,
        ranks: int,
        independent: int = 0,
        note: str = "",
    ) -> NoiseDistribution:
        if samples.size == 0:
            raise UsageError(f"no noise windows in the {source} trace: nothing to simulate from")
        values, counts = np.unique(samples, return_counts=True)
        return cls(
            values,
            np.cumsum(counts),
            source,
            window_ns,
            ranks,
            independent or int(samples.size),
            note,
        )

    @property
    def count(self) -> int:
        return int(self.cumulative[-1])

    def mean(self) -> float:
        counts = np.diff(self.cumulative, prepend=0)
        return float(np.dot(self.values.astype(np.float64), counts) / self.count)

    def quantile(self, q: float) -> float:
        k = order_index(q, self.count) + 1
        return float(self.values[np.searchsorted(self.cumulative, k, side="left")])

    def expected_max(self, ranks: int) -> float:
        """Exact E[max of `ranks` iid draws]."""
        cdf = np.exp(ranks * np.log(self.cumulative / self.count))
        weights = np.diff(cdf, prepend=0.0)
        return float(np.dot(self.values.astype(np.float64), weights))

    def draw_max(self, ranks: int, iterations: int, rng: np.random.Generator) -> np.ndarray:
        """`iterations` exact draws of the max over `ranks` ranks: F^-1(U^(1/P))."""
        u = 1.0 - rng.random(iterations)  # (0, 1]
        above = -np.expm1(np.log(u) / ranks)  # 1 - U^(1/P), accurate near 0
        n = self.count
        k = np.clip(n - np.floor(above * n).astype(np.int64), 1, n)  # ceil(n * U^(1/P))
        return self.values[np.searchsorted(self.cumulative, k, side="left")]


def _fwq_windows(run: Run, k: int, cap: int, block: int) -> tuple[list[np.ndarray], int]:
    ranks, n = run[FWQ].shape
    out, used = [], 0
    per_rank = max(1, cap // max(1, ranks))
    for r in range(ranks):
        m = moments(run.rank_blocks(FWQ, r, block))
        if m is None or m.maximum <= 0 or n < k:
            continue
        used += 1
        stride = max(1, math.ceil((n - k + 1) / per_rank))
        tail, pos = np.zeros(0, dtype=np.int64), 0
        for b in run.rank_blocks(FWQ, r, block):
            buf = np.concatenate([tail, b.astype(np.int64) - m.minimum])
            if buf.size < k:
                tail = buf
                continue
            c = np.concatenate([[0], np.cumsum(buf)])
            sums = c[k:] - c[:-k]  # windows starting at pos, pos+1, ...
            out.append(sums[(-pos) % stride :: stride])
            consumed = buf.size - k + 1
            tail, pos = buf[consumed:], pos + consumed
    return out, used


def from_fwq(
    run: Run, work_ns: float, max_windows: int = MAX_WINDOWS, block: int = BLOCK_ELEMENTS
) -> NoiseDistribution:
    """Noise of windows of about `work_ns`, from FWQ samples (see the module docstring)."""
    ds = run[FWQ]
    minima = [
        m.minimum
        for r in range(ds.shape[0])
        if (m := moments(run.rank_blocks(FWQ, r, block))) is not None and m.maximum > 0
    ]
    if not minima:
        raise UsageError(f"{run.path}: no rank recorded FWQ samples")
    quantum = float(np.median(minima))
    k = max(1, round(work_ns / quantum))
    if k > ds.shape[1]:
        raise UsageError(
            f"work of {work_ns / 1e3:g} us spans more than the {ds.shape[1]} FWQ samples of "
            f"{quantum / 1e3:g} us per rank of {run.path}"
        )
    windows, used = _fwq_windows(run, k, max_windows, block)
    window = k * quantum
    note = (
        f"noise of {counted(k, 'consecutive FWQ quantum', 'consecutive FWQ quanta')} of "
        f"{fmt(quantum / 1e3)} us = {fmt(window / 1e3)} us "
        "of work"
    )
    if abs(window - work_ns) > 0.05 * work_ns:
        note += f" (requested {work_ns / 1e3:g} us is not a whole number of quanta" + (
            "; shorter work than one quantum sees less noise than this predicts)"
            if work_ns < quantum
            else ")"
        )
    return NoiseDistribution.from_samples(
        np.concatenate(windows), "fwq", window, used, used * (ds.shape[1] // k), note
    )


def _merged(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted, non-overlapping busy intervals (overlapping detours merged)."""
    order = np.argsort(starts, kind="stable")
    s, e = starts[order], ends[order]
    if s.size == 0:
        return s, e
    reach = np.maximum.accumulate(e)
    new = np.ones(s.size, dtype=bool)
    new[1:] = s[1:] > reach[:-1]
    first = np.flatnonzero(new)
    return s[first], np.maximum.reduceat(e, first)


def detour_delays(
    starts: np.ndarray, durations: np.ndarray, span_ns: int, work_ns: int, windows: int
) -> np.ndarray:
    """Noise of `windows` windows of `work_ns` started on a grid over one rank's span."""
    s, e = _merged(starts.astype(np.int64), starts.astype(np.int64) + durations.astype(np.int64))
    if s.size == 0:
        return np.zeros(windows if span_ns > work_ns else 0, dtype=np.int64)
    last = int(e.max())
    # Starts relative to the measurement (all within the span) or absolute clock readings.
    origin = 0 if last <= span_ns else min(int(s.min()), last - span_ns)
    end = max(origin + span_ns, last)
    room = end - origin - work_ns
    if room <= 0:
        return np.zeros(0, dtype=np.int64)
    t = origin + (2 * np.arange(windows, dtype=np.int64) + 1) * room // (2 * windows)
    busy = np.concatenate([[0], np.cumsum(e - s)])  # detour time before interval j
    free_at = s - busy[:-1]  # F at the start of interval j
    j = np.searchsorted(s, t, side="right") - 1
    jj = np.maximum(j, 0)
    f_t = np.where(j >= 0, np.maximum(t - busy[jj + 1], free_at[jj]), t)
    y = f_t + work_ns
    x = y + busy[np.searchsorted(free_at, y, side="left")]
    return (x - t - work_ns)[x <= end]


def from_detours(run: Run, work_ns: float, max_windows: int = MAX_WINDOWS) -> NoiseDistribution:
    """Noise of windows of `work_ns` from selfish-detour events (see the module docstring)."""
    if SPAN not in run:
        raise RunFileError(
            f"{run.path}: detour events without {SPAN!r}: the measured span is needed"
        )
    spans = run.read(SPAN).astype(np.int64)
    work = int(round(work_ns))
    delays, used, independent = [], 0, 0
    ranks = len(run.row_offsets(DETOURS)) - 1
    per_rank = max(1, max_windows // max(1, ranks))
    for r in range(min(ranks, spans.size)):
        span = int(spans[r])
        if span <= work:
            continue
        rows = run.table(DETOURS, r)
        n = min(per_rank, max(1000, math.ceil(GRID_PER_WINDOW * (span - work) / work)))
        d = detour_delays(rows["start_ns"], rows["duration_ns"], span, work, n)
        if d.size:
            delays.append(d)
            used += 1
            independent += span // work
    if not delays:
        raise UsageError(
            f"work of {work_ns / 1e3:g} us is longer than every rank's detour span "
            f"in {run.path}"
        )
    note = f"noise of {work_ns / 1e3:g} us windows on a grid over each rank's detour span"
    return NoiseDistribution.from_samples(
        np.concatenate(delays), "detours", float(work), used, independent, note
    )


def load(
    run: Run, work_ns: float, source: str = "auto", max_windows: int = MAX_WINDOWS
) -> NoiseDistribution:
    """The noise distribution of `run` for `source` ('fwq', 'detours', or 'auto': FWQ when
    recorded, else detours)."""
    if not (math.isfinite(work_ns) and work_ns > 0):
        raise UsageError(f"--work-us must be positive (and finite), got {work_ns / 1e3:g}")
    if source == "auto":
        source = "fwq" if FWQ in run else "detours" if DETOURS in run else ""
        if not source:
            raise UsageError(
                f"{run.path} has neither FWQ samples nor detour events to simulate from"
            )
    if source == "fwq":
        if FWQ not in run:
            raise UsageError(f"{run.path} has no FWQ samples ({FWQ})")
        return from_fwq(run, work_ns, max_windows)
    if source == "detours":
        if DETOURS not in run:
            raise UsageError(f"{run.path} has no detour events ({DETOURS})")
        return from_detours(run, work_ns, max_windows)
    raise UsageError(f"unknown noise source {source!r} (use fwq, detours or auto)")


@dataclass
class Prediction:
    ranks: int
    expected_max_ns: float  # exact E[max over ranks of one window's noise]
    slowdown: float  # (W + E[max]) / W
    amplification: float  # E[max] / E[noise of one rank]
    mc_mean_max_ns: float  # Monte Carlo over the iterations
    mc_slowdown: float
    mc_p99_iteration_ns: float  # p99 over the iterations of W + max

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class Simulation:
    path: str
    source: str
    note: str
    work_ns: float  # the window the noise belongs to (the work per iteration)
    windows: int
    independent_windows: int
    ranks_measured: int
    mean_noise_ns: float
    p99_noise_ns: float
    max_noise_ns: float
    iterations: int
    seed: int
    predictions: list[Prediction] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        d = dict(vars(self))
        d["predictions"] = [p.to_json() for p in self.predictions]
        return d


def tree_predictions(dist: NoiseDistribution, sim: Simulation, round_ns: float,
                     allreduces: int = 1, samples: int = 200_000) -> list[tuple[int, float]]:
    """Per rank count: the iteration time when the synchronisation is `allreduces`
    recursive-doubling allreduces with LogGP-style rounds of `round_ns`, the noise of each
    rank's work and of each message's CPU overhead drawn from `dist` (`analysis.predict`),
    beside the barrier model's W + E[max]."""
    from mckmpi.analysis.predict import collective_table

    draws = dist.draw_max(1, samples, np.random.default_rng(sim.seed)).astype(np.float64)
    return collective_table(draws, sim.work_ns, [p.ranks for p in sim.predictions], round_ns,
                            allreduces, sim.seed)


def tree_text(sim: Simulation, tree: list[tuple[int, float]], round_ns: float,
              allreduces: int) -> str:
    rows = [[p.ranks, num((sim.work_ns + p.expected_max_ns) / 1e3), num(t / 1e3),
             num(t / sim.work_ns), num(t / (sim.work_ns + p.expected_max_ns))]
            for p, (_, t) in zip(sim.predictions, tree, strict=True)]
    return "\n".join([
        render(("ranks", "barrier us", "tree us", "tree slowdown", "tree / barrier"), rows,
               title=f"{counted(allreduces, 'allreduce')} per iteration as recursive-doubling "
                     "trees, "
                     f"{fmt(round_ns / 1e3)} us per round (LogGP: L + 2o + sG)"),
        "barrier: W + E[max] (above); tree: per-rank simulation, ceil(log2 P) rounds per "
        "allreduce, each waiting for its partner, noise also hitting the message overheads "
        "(median iteration of the slowest rank)",
    ])


#: The most ranks a prediction is made for: a thousand times the largest machines' cores,
#: where the slowest rank has long met the largest noise ever measured.
MAX_RANKS = 10**10
#: The most Monte Carlo iterations: 8 MB per draw, far past a converged p99.
MAX_ITERATIONS = 10**6


def parse_ranks(text: str) -> list[int]:
    """'1e3,1e4,1e5' -> [1000, 10000, 100000]; whole numbers from 1 to `MAX_RANKS`."""
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            value = float(part)
        except ValueError:
            raise UsageError(f"--ranks: not a number: {part!r} (use e.g. 1e3,1e4,1e5)") from None
        if not math.isfinite(value) or value < 1 or value != int(value):
            raise UsageError(f"--ranks: {part!r} is not a whole number of ranks >= 1")
        if value > MAX_RANKS:
            raise UsageError(f"--ranks: {part!r} is more than {MAX_RANKS:,} ranks, beyond any "
                             "machine (the largest have about 1e7 cores)")
        out.append(int(value))
    return out


def simulate(
    dist: NoiseDistribution, ranks: Iterable[int], iterations: int, seed: int = 0, path: str = ""
) -> Simulation:
    """Predictions for every rank count (a 1-rank reference row first)."""
    if not 1 <= iterations <= MAX_ITERATIONS:
        raise UsageError(f"--iterations must be at least 1 and at most {MAX_ITERATIONS:,} (each "
                         f"draws one number per rank count), got {iterations}")
    if seed < 0:
        raise UsageError(f"--seed must be a whole number from 0, got {seed}")
    rng = np.random.default_rng(seed)
    mean = dist.mean()
    w = dist.window_ns
    sim = Simulation(
        path,
        dist.source,
        dist.note,
        w,
        dist.count,
        dist.independent,
        dist.ranks,
        mean,
        dist.quantile(0.99),
        float(dist.values[-1]),
        iterations,
        seed,
    )
    counts: Sequence[int] = sorted({1, *ranks})
    for p in counts:
        exact = dist.expected_max(p)
        draws = dist.draw_max(p, iterations, rng).astype(np.float64)
        sim.predictions.append(
            Prediction(
                p,
                exact,
                (w + exact) / w,
                exact / mean if mean > 0 else math.nan,
                float(draws.mean()),
                (w + float(draws.mean())) / w,
                w + float(np.sort(draws)[order_index(0.99, draws.size)]),
            )
        )
    return sim


def text(sim: Simulation) -> str:
    beyond = [p.ranks for p in sim.predictions if p.ranks > sim.independent_windows]
    rows = [
        [
            p.ranks,
            num(p.expected_max_ns / 1e3),
            num(p.slowdown),
            num(p.amplification),
            num(p.mc_mean_max_ns / 1e3),
            num(p.mc_slowdown),
            num(p.mc_p99_iteration_ns / 1e3),
        ]
        for p in sim.predictions
    ]
    return "\n".join(
        [
            f"noise source  {sim.source} trace of {sim.path}: "
            f"{counted(sim.ranks_measured, 'measured rank')}, "
            f"{counted(sim.windows, 'window')} ({sim.independent_windows} without overlap)",
            f"window        {sim.note}",
            f"one rank      noise per iteration: mean {fmt(sim.mean_noise_ns / 1e3)} us, "
            f"p99 {fmt(sim.p99_noise_ns / 1e3)} us, max {fmt(sim.max_noise_ns / 1e3)} us",
            "",
            render(
                (
                    "ranks",
                    "E[max] us",
                    "slowdown",
                    "amplif.",
                    "MC max us",
                    "MC slowdown",
                    "MC p99 iter us",
                ),
                rows,
                title=f"bulk-synchronous app, {fmt(sim.work_ns / 1e3)} us of work per iteration",
            ),
            "E[max]: expected noise of the slowest rank per iteration, exact for the measured "
            "distribution; slowdown = (work + E[max]) / work;",
            "amplif. = E[max] / mean noise of one rank;",
            f"MC: {sim.iterations} iterations, each max drawn as F^-1(U^(1/P)) (seed {sim.seed}); "
            "ranks suffer noise independently (iid draws from all measured ranks).",
        ]
        + (
            [
                f"caution: {', '.join(map(str, beyond))} ranks exceed the "
                f"{sim.independent_windows} non-overlapping windows measured; their slowest rank "
                "nearly always hits the largest noise ever measured, and the tail beyond it is "
                "unknown: record longer traces"
            ]
            if beyond
            else []
        )
    )
