"""Selfish detour (after netgauge's selfish benchmark).

Each rank spins reading the clock for a fixed duration. A gap between two consecutive reads
above the threshold is a detour: the rank was away doing something else (an interrupt,
another thread, the kernel, the interpreter). Every detour is recorded with its start and
duration; the noise fraction is the sum of the durations over the measured span. The time
spent recording a detour is not counted as the next one; it is also the loop's safe point,
where a due flush of the trace runs (see `mckmpi.trace.tracer.FlushTurn`).

The threshold defaults to 5x the minimum loop time, measured on each rank with the same
loop just before the run. The loop is Python (a clock read, a subtraction, a comparison),
so its minimum time (around 0.1-0.2 us) bounds the shortest detour it can see; the
threshold and the minimum loop time are recorded with the events.

Records: table noise/detours (start_ns, duration_ns: CLOCK_MONOTONIC ns, sorted by start;
streamed while the rank spins);
scalars noise/detour_span_ns, noise/detour_threshold_ns, noise/detour_min_loop_ns,
noise/detour_dropped (events beyond --max-events, counted but not kept).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np
from mpi4py import MPI

import mckmpi
from mckmpi import appkit
from mckmpi.appkit import NEVER, clock
from mckmpi.utility.table import counted

DETOUR_DTYPE = np.dtype([("start_ns", "i8"), ("duration_ns", "i8")])


def parse(argv: list[str]) -> tuple[appkit.AppParser, argparse.Namespace]:
    p = appkit.parser("detour", __doc__)
    p.add_argument("--duration-s", type=appkit.positive_float, default=10.0,
                   help="how long each rank spins [10 s]")
    p.add_argument("--threshold-ns", type=appkit.nonnegative_int, default=0,
                   help="gaps above this are detours; 0 = 5x the minimum loop time [0]")
    p.add_argument("--max-events", type=appkit.positive_int, default=100_000,
                   help="detours kept per rank; later ones are only counted [100000]")
    return p, p.parse_args(argv)


def min_loop_ns(span_ns: int = 50_000_000) -> int:
    """Shortest time between two reads in the detour loop, over `span_ns` of spinning."""
    c = clock
    best = NEVER
    last = c()
    end = last + span_ns
    while last < end:
        now = c()
        if now - last < best:
            best = now - last
        last = now
    return best


def spin(events: np.ndarray, span_ns: int, threshold: int, inj: appkit.Injector,
         kept: Any) -> tuple[int, int, int]:
    """Spin for `span_ns`, recording detours into `events` (``kept.filled`` follows the rows
    written); returns (first read, last read, detours seen)."""
    c = clock
    starts, durations = events["start_ns"], events["duration_ns"]
    cap = len(events)
    n = 0
    first = last = c()
    end = first + span_ns
    next_event = min(end, inj.due)
    while True:
        now = c()
        if now - last > threshold:
            if n < cap:
                starts[n] = last
                durations[n] = now - last
                kept.filled = n + 1  # a safe point: a due flush of the trace runs here
            n += 1
            now = c()  # the recording (and a flush) is not a detour of the next read
        if now >= next_event:
            if now >= end:
                return first, now, n
            inj.fire()
            next_event = min(end, inj.due)
        last = now


def main(argv: list[str] | None = None) -> None:
    p, args = parse(sys.argv[1:] if argv is None else argv)
    ctx = mckmpi.context()
    comm = MPI.COMM_WORLD
    inj = appkit.injector(args, p, comm)
    span_ns = round(args.duration_s * 1e9)
    events = ctx.mem.zeros(args.max_events, dtype=DETOUR_DTYPE)
    # Streamed: detours reach the run file while the rank spins.
    recorded = ctx.tracer.stream("noise", "detours", events,
                                 units={"start_ns": "ns", "duration_ns": "ns"})
    loop_ns = max(1, min_loop_ns())
    threshold = args.threshold_ns or 5 * loop_ns
    result = (0, 0, 0)

    def measure() -> None:
        nonlocal result
        inj.start(comm)
        result = spin(events, span_ns, threshold, inj, recorded)
        inj.stop()

    appkit.run_phases(ctx, measure)
    first, last, n = result
    kept = min(n, args.max_events)
    measured = last - first
    seen = events[:kept]
    ok = (measured >= span_ns and recorded.filled == kept
          and bool(np.all(np.diff(seen["start_ns"]) > 0))
          and bool(np.all(seen["duration_ns"] > threshold)))
    appkit.verify_all(comm, ok, "detour events are not a sorted set of gaps above the threshold")
    tracer = ctx.tracer
    tracer.scalar("noise", "detour_span_ns", measured, units="ns")
    tracer.scalar("noise", "detour_threshold_ns", threshold, units="ns")
    tracer.scalar("noise", "detour_min_loop_ns", loop_ns, units="ns")
    tracer.scalar("noise", "detour_dropped", n - kept, units="count")
    inj.record(tracer)
    fraction = float(seen["duration_ns"].sum()) / measured
    fractions = comm.gather(fraction, root=0)
    counts = comm.gather(n, root=0)
    if comm.Get_rank() == 0:
        print(f"detour: {counted(comm.Get_size(), 'rank')} x {measured / 1e9:.2f} s, "
              f"threshold {threshold} ns "
              f"(rank 0 loop {loop_ns} ns); detours per rank {counts}, noise fraction per rank "
              + " ".join(f"{f:.2e}" for f in fractions))


if __name__ == "__main__":
    main()
