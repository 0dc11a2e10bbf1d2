"""FWQ: fixed work quanta (after LLNL's Sequoia FWQ benchmark).

A calibrated unit of work is repeated; the duration of every repetition is one sample.
On a quiet core all samples equal the quantum; everything above it is noise the rank
suffered. Runs under the harness (`mckmpi run -- apps/fwq.py`) or bare
(`mpiexec -n 2 python apps/fwq.py`).

The timed work is a numpy kernel over a cache-resident array (`np.sqrt(x, out=y)` repeated),
so the interpreter's share of each quantum is small and nothing is allocated in the loop.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from mpi4py import MPI

import mckmpi

ELEMENTS = 2048  # 16 KiB of float64: stays in L1/L2, so the work is compute, not memory


def work(x: np.ndarray, y: np.ndarray, reps: int) -> None:
    for _ in range(reps):
        np.sqrt(x, out=y)


def calibrate(x: np.ndarray, y: np.ndarray, quantum_ns: int) -> int:
    """Repetitions of the kernel that take `quantum_ns`, from the fastest of a few trials."""
    reps = 1
    clock = time.perf_counter_ns
    while True:
        best = min(_timed(x, y, reps, clock) for _ in range(5))
        if best >= quantum_ns / 4 or reps > 1 << 24:
            return max(1, round(reps * quantum_ns / best))
        reps *= 2


def _timed(x: np.ndarray, y: np.ndarray, reps: int, clock) -> int:
    t0 = clock()
    work(x, y, reps)
    return clock() - t0


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fwq", description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=10_000, help="samples per rank [10000]")
    p.add_argument("--quantum-us", type=float, default=1000.0, help="target work quantum [1000 us]")
    args = p.parse_args(argv)
    if args.samples < 1:
        p.error(f"--samples must be positive, got {args.samples}")
    if args.quantum_us < 10:
        p.error(f"--quantum-us must be at least 10 us, got {args.quantum_us}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv)
    ctx = mckmpi.context()
    comm = MPI.COMM_WORLD
    x = ctx.mem.full(ELEMENTS, 2.0)
    y = ctx.mem.empty(ELEMENTS)
    samples = ctx.mem.zeros(args.samples, dtype=np.int64)
    quantum_ns = int(args.quantum_us * 1000)
    # Every rank must do the same work: rank 0's calibration is everyone's.
    reps = comm.bcast(calibrate(x, y, quantum_ns) if comm.Get_rank() == 0 else None, root=0)
    clock = time.perf_counter_ns
    comm.Barrier()
    for i in range(args.samples):
        t0 = clock()
        work(x, y, reps)
        samples[i] = clock() - t0
    if not np.allclose(y, np.sqrt(2.0)):
        raise RuntimeError("FWQ kernel produced a wrong result")
    ctx.tracer.array("noise", "fwq_ns", samples, units="ns")
    ctx.tracer.attrs("noise", fwq_quantum_ns=quantum_ns, fwq_reps=reps, fwq_elements=ELEMENTS)
    if comm.Get_rank() == 0:
        print(f"fwq: {comm.Get_size()} ranks x {args.samples} samples, quantum {quantum_ns} ns "
              f"({reps} reps), rank 0 median {int(np.median(samples))} ns, max {int(samples.max())} ns")


if __name__ == "__main__":
    main()
