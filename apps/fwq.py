"""FWQ: fixed work quanta (after LLNL's Sequoia FWQ benchmark).

A calibrated unit of work is repeated; the duration of every repetition is one sample. On a
quiet core every sample equals the quantum; whatever lies above it is noise the rank
suffered. The quantum is the same work on every rank, calibrated to the fastest unit any
rank measured.

The timed work is a numpy kernel over a cache-resident array (`np.sqrt(x, out=y)` repeated),
so the interpreter's share of a quantum is small and nothing is allocated in the loop. The
benchmark's own resolution is recorded with the samples: the cost and the resolution of
the clock, and the shortest quantum it accepts (50x the clock's step, never below 10 us).

Records: noise/fwq_ns [ranks, samples] int64 ns (streamed while sampling); attrs of noise: fwq_quantum_ns, fwq_reps,
fwq_unit_ns, fwq_min_quantum_ns, timer_cost_ns, timer_resolution_ns.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from mpi4py import MPI

import mckmpi
from mckmpi import appkit
from mckmpi.appkit import clock
from mckmpi.utility.table import counted


def parse(argv: list[str]) -> tuple[appkit.AppParser, argparse.Namespace]:
    p = appkit.parser("fwq", __doc__)
    p.add_argument("--samples", type=appkit.positive_int, default=10_000,
                   help="samples per rank [10000]")
    p.add_argument("--quantum-us", type=appkit.positive_float, default=1000.0,
                   help="target work quantum in us, down to the benchmark's resolution "
                        "(10 us on a fast clock) [1000]")
    return p, p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    p, args = parse(sys.argv[1:] if argv is None else argv)
    ctx = mckmpi.context()
    comm = MPI.COMM_WORLD
    inj = appkit.injector(args, p, comm)
    timer = appkit.agreed_timer(comm, appkit.measure_timer())
    quantum_ns = timer.check_quantum(p, "--quantum-us", args.quantum_us)
    kernel = appkit.WorkKernel(ctx.mem)
    samples = ctx.mem.zeros(args.samples, dtype=np.int64)
    # Streamed: under the harness the samples reach the run file while they are taken.
    stream = ctx.tracer.stream("noise", "fwq_ns", samples, units="ns")
    run = kernel.runner(inj)
    # Every rank does the same work: the fastest unit any rank measured sets the repetitions,
    # so no rank's quiet samples fall short of the quantum.
    unit_ns = comm.allreduce(kernel.unit_ns(run), op=MPI.MIN)
    reps = appkit.reps_for(quantum_ns, unit_ns)

    def measure() -> None:
        inj.start(comm)
        c = clock
        for i in range(args.samples):
            t0 = c()
            run(reps)
            samples[i] = c() - t0
            stream.filled = i + 1
        inj.stop()

    ctx.tracer.attrs("noise", fwq_quantum_ns=quantum_ns, fwq_reps=reps,
                     fwq_unit_ns=round(unit_ns), fwq_elements=kernel.elements,
                     fwq_min_quantum_ns=timer.min_quantum_ns, timer_cost_ns=timer.cost_ns,
                     timer_resolution_ns=timer.resolution_ns)
    appkit.run_phases(ctx, measure)
    appkit.verify_all(comm, kernel.verify(), "FWQ kernel produced a wrong result")
    inj.record(ctx.tracer)
    worst = comm.reduce(int(samples.max()), op=MPI.MAX, root=0)
    if comm.Get_rank() == 0:
        print(f"fwq: {counted(comm.Get_size(), 'rank')} x {counted(args.samples, 'sample')}, "
              f"quantum {quantum_ns} ns "
              f"({reps} x {unit_ns:.0f} ns), rank 0 median {int(np.median(samples))} ns, "
              f"max over ranks {worst} ns; timer {timer.cost_ns} ns/read, "
              f"resolution {timer.resolution_ns} ns, min quantum {timer.min_quantum_ns} ns")


if __name__ == "__main__":
    main()
