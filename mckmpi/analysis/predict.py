"""Predicting a study's larger points from its smallest: noise propagated through the app's
synchronisation, with LogGP-style collectives.

`mckmpi simulate` answers "what does this noise cost a bulk-synchronous app at P ranks"
with one global barrier per iteration: W + E[max of P noise draws]. Real apps synchronise
through messages, and how noise spreads depends on the pattern (Hoefler, Schneider and
Lumsdaine's LogGOPSim studies): a nearest-neighbour halo exchange waits for a handful of
neighbours, an allreduce is a tree of log2(P) rounds of point-to-point messages, each with
a latency L, a CPU overhead o at both ends (which noise can hit) and a per-byte gap G.
This module simulates exactly that, per rank and per iteration, with vectorised numpy:

- compute: every rank computes W and suffers a noise draw D_i (the empirical distribution
  of the app's own compute times in the smallest point: per rank, each iteration's compute
  time minus the rank's fastest; W = the median of the ranks' fastest). When W changes
  (strong scaling: W = W0 P0 / P) the noise of a shorter window is thinned: a draw is kept
  with probability W / W0 (noise events become rarer, not smaller);
- halo exchange: t_i = max(t_i, t_j for neighbours j) + h (neighbours +-1 and, for a 2-D
  or 3-D process grid, +-P^(1/d) on a ring of ranks);
- allreduce: recursive doubling, ceil(log2 P) rounds; in round k rank i waits for partner
  i xor 2^k, then t_i = max(t_i, t_partner) + c + D_o, D_o the noise of a window of o = c/2
  (thinned as above). c (= L + 2o + sG for the 8-byte messages of a dot product) is
  calibrated on the smallest point with at least 2 ranks: the fastest iteration's
  allreduce time divided by the rounds, h likewise from the fastest halo exchange.

The predicted time per iteration is the median over simulated iterations of the slowest
rank's step (as `study collect` measures `iter_us`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: Synchronisation per iteration of the study apps: (halo exchanges, allreduces).
PATTERNS = {"cg": (1, 2), "stencil": (1, 0)}
#: Simulated iterations (after a warm-up of the same length).
ITERATIONS = 200


@dataclass(frozen=True)
class Calibration:
    """What the smallest points of a series say about the machine and the app."""

    work_ns: float            # W0: noise-free compute per iteration and rank
    ranks: int                # P0 of the noise sample
    noise_ns: np.ndarray      # noise of one compute window of W0 (one value per rank-iteration)
    halo_ns: float            # h: fastest halo exchange
    round_ns: float           # c: one allreduce round
    ndim: int                 # process-grid dimensions (halo neighbours)
    halos: int
    allreduces: int


def rounds(ranks: int) -> int:
    return math.ceil(math.log2(ranks)) if ranks > 1 else 0


def noise_sample(compute_ns: np.ndarray) -> tuple[float, np.ndarray]:
    """(W0, noise draws) from a [ranks, iterations] array of compute times."""
    compute = np.asarray(compute_ns, dtype=np.float64)
    fastest = compute.min(axis=1, keepdims=True)
    return float(np.median(fastest)), (compute - fastest).ravel()


def _draw(noise: np.ndarray, size: int, keep: float, rng: np.random.Generator) -> np.ndarray:
    d = noise[rng.integers(0, noise.size, size)]
    if keep < 1.0:
        d = np.where(rng.random(size) < keep, d, 0.0)
    return d


def _halo(t: np.ndarray, ndim: int, h: float) -> np.ndarray:
    p = t.size
    ready = t.copy()
    offsets = {1}
    if ndim > 1:
        offsets.add(max(1, round(p ** (1 / ndim))))
    for off in offsets:
        if off < p:
            ready = np.maximum(ready, np.maximum(np.roll(t, off), np.roll(t, -off)))
    return ready + h


def _allreduce(t: np.ndarray, cal: Calibration, keep_o: float, rng: np.random.Generator) -> np.ndarray:
    p = t.size
    idx = np.arange(p)
    for k in range(rounds(p)):
        partner = idx ^ (1 << k)
        valid = partner < p  # ranks beyond a power of two skip a round they have no partner in
        other = np.where(valid, t[np.minimum(partner, p - 1)], t)
        t = np.maximum(t, other) + cal.round_ns + _draw(cal.noise_ns, p, keep_o, rng)
    return t


def iteration_ns(cal: Calibration, ranks: int, work_ns: float, seed: int = 0,
                 iterations: int = ITERATIONS) -> float:
    """Predicted time per iteration (median over iterations of the slowest rank's step)."""
    rng = np.random.default_rng(seed)
    keep_w = min(1.0, work_ns / cal.work_ns)
    keep_o = min(1.0, cal.round_ns / 2 / cal.work_ns)
    t = np.zeros(ranks)
    steps = []
    for i in range(2 * iterations):
        before = t.max()
        t = t + work_ns + _draw(cal.noise_ns, ranks, keep_w, rng)
        for _ in range(cal.halos):
            t = _halo(t, cal.ndim, cal.halo_ns)
        for _ in range(cal.allreduces):
            t = _allreduce(t, cal, keep_o, rng)
        if i >= iterations:
            steps.append(t.max() - before)
    return float(np.median(steps))


#: Rank-iterations one prediction simulates at most (a million ranks get fewer iterations).
BUDGET = 20_000_000


def iterations_for(ranks: int) -> int:
    """Simulated iterations for `ranks`: ITERATIONS, fewer for huge rank counts (>= 10)."""
    return max(10, min(ITERATIONS, BUDGET // max(1, ranks)))


def collective_table(noise_ns: np.ndarray, work_ns: float, ranks: list[int], round_ns: float,
                     allreduces: int, seed: int = 0) -> list[tuple[int, float]]:
    """(ranks, predicted ns per iteration) of a bulk-synchronous app whose iterations end in
    `allreduces` recursive-doubling allreduces of `round_ns` per round, its noise drawn from
    `noise_ns` (the noise of one window of `work_ns`)."""
    cal = Calibration(work_ns, 1, np.asarray(noise_ns, dtype=np.float64), 0.0, round_ns, 1, 0,
                      allreduces)
    return [(p, iteration_ns(cal, p, work_ns, seed, iterations_for(p))) for p in ranks]


def calibrate(app: str, compute_ns: np.ndarray, halo_ns: np.ndarray | None,
              allreduce_ns: np.ndarray | None, ranks: int, ndim: int,
              comm_ranks: int | None = None) -> Calibration:
    """A calibration from the smallest point's per-rank, per-iteration phase times.

    `halo_ns`/`allreduce_ns` may come from another point (`comm_ranks`, the smallest with at
    least 2 ranks): message costs cannot be seen in a 1-rank run."""
    halos, allreduces = PATTERNS.get(app, (1, 0))
    work, noise = noise_sample(compute_ns)
    comm_p = comm_ranks or ranks
    h = c = 0.0
    if halo_ns is not None and halos:
        h = float(np.median(np.min(halo_ns, axis=1))) / halos
    if allreduce_ns is not None and allreduces and rounds(comm_p):
        c = float(np.median(np.min(allreduce_ns, axis=1))) / (allreduces * rounds(comm_p))
    return Calibration(work, ranks, noise, h, c, ndim, halos, allreduces)
