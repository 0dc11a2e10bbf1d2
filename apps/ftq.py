"""FTQ: fixed time quanta.

Time is cut into back-to-back intervals of fixed length from a start common to all ranks
(rank 0's clock mapped onto each rank's by ping-pong), and each rank counts the units of
work that complete in every interval. On a quiet core the counts are flat; time taken by
noise shows up as missing work, at the time it happened, on a uniform time grid (suitable
for spectral analysis). A unit that ends in interval i is
counted in interval i; intervals that a long interruption skipped entirely count 0.

The unit of work is one numpy kernel call over a cache-resident array (`np.sqrt(x, out=y)`)
followed by one clock read; nothing is allocated in the loop.

Records: noise/ftq_counts [ranks, intervals] int64 (units per interval), noise/ftq_start_ns
[ranks, intervals] int64 (interval start, CLOCK_MONOTONIC ns), both streamed as intervals
end; attrs of noise:
ftq_interval_ns, ftq_unit_ns (fastest unit of any rank), timer_cost_ns, timer_resolution_ns.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np
from mpi4py import MPI

import mckmpi
from mckmpi import appkit
from mckmpi.appkit import clock
from mckmpi.utility.table import counted


def parse(argv: list[str]) -> tuple[appkit.AppParser, argparse.Namespace]:
    p = appkit.parser("ftq", __doc__)
    p.add_argument("--intervals", type=appkit.positive_int, default=10_000,
                   help="intervals per rank [10000]")
    p.add_argument("--interval-us", type=appkit.positive_float, default=1000.0,
                   help="interval length in us, down to the benchmark's resolution [1000]")
    return p, p.parse_args(argv)


def count_units(kernel: appkit.WorkKernel, counts: np.ndarray, t0: int, interval: int,
                inj: appkit.Injector, done: Any) -> None:
    """Fill `counts` with the units completed in each interval after `t0`; `done.filled`
    follows the intervals that are over (the stream of the counts)."""
    x, y, sqrt, c = kernel.x, kernel.y, np.sqrt, clock
    n = len(counts)
    i = count = 0
    boundary = t0 + interval
    next_event = min(boundary, inj.due)
    while True:
        sqrt(x, out=y)
        now = c()
        if now < next_event:
            count += 1
            continue
        if now >= inj.due:
            inj.fire()
        if now < boundary:
            count += 1
        else:
            counts[i] = count
            i = (now - t0) // interval
            if i >= n:
                done.filled = n
                break
            done.filled = i
            count = 1
            boundary = t0 + (i + 1) * interval
        next_event = min(boundary, inj.due)


def main(argv: list[str] | None = None) -> None:
    p, args = parse(sys.argv[1:] if argv is None else argv)
    ctx = mckmpi.context()
    comm = MPI.COMM_WORLD
    inj = appkit.injector(args, p, comm)
    timer = appkit.agreed_timer(comm, appkit.measure_timer())
    interval_ns = timer.check_quantum(p, "--interval-us", args.interval_us)
    kernel = appkit.WorkKernel(ctx.mem)
    counts = ctx.mem.zeros(args.intervals, dtype=np.int64)
    starts = ctx.mem.zeros(args.intervals, dtype=np.int64)
    # Streamed: the intervals that are over reach the run file while the app runs.
    done = ctx.tracer.stream("noise", "ftq_counts", counts, units="count")
    ctx.tracer.stream("noise", "ftq_start_ns", starts, units="ns", along=done)
    unit_ns = comm.allreduce(kernel.unit_ns(kernel.run), op=MPI.MIN)

    def measure() -> None:
        t0 = inj.start(comm)
        np.multiply(np.arange(args.intervals, dtype=np.int64), interval_ns, out=starts)
        np.add(starts, t0, out=starts)
        while clock() < t0:
            pass
        count_units(kernel, counts, t0, interval_ns, inj, done)
        inj.stop()

    appkit.run_phases(ctx, measure)
    appkit.verify_all(comm, kernel.verify() and counts.sum() > 0,
                      "FTQ kernel produced a wrong result or no work was counted")
    tracer = ctx.tracer
    tracer.attrs("noise", ftq_interval_ns=interval_ns, ftq_unit_ns=round(unit_ns),
                 ftq_elements=kernel.elements, timer_cost_ns=timer.cost_ns,
                 timer_resolution_ns=timer.resolution_ns)
    inj.record(tracer)
    low = comm.reduce(int(counts.min()), op=MPI.MIN, root=0)
    if comm.Get_rank() == 0:
        print(f"ftq: {counted(comm.Get_size(), 'rank')} x {counted(args.intervals, 'interval')} "
              f"of {interval_ns} ns, "
              f"unit {unit_ns:.0f} ns; rank 0 median {int(np.median(counts))} units, max "
              f"{int(counts.max())}, min over ranks {low}")


if __name__ == "__main__":
    main()
