"""Allreduce: a latency loop over message sizes (the most noise-sensitive pattern).

For every size, all ranks run --iterations MPI_Allreduce calls (sum of float64) after
--warmup untimed ones. With --work-us, each call is preceded by a fixed quantum of compute
(the FWQ kernel, the same on every rank, calibrated to the fastest rank): the bulk-synchronous
compute-collective loop of noise-amplification studies, where one rank's detour delays all.

Verified: every rank contributes rank+1 in every element, so each result element must be
exactly size*(size+1)/2.

Records: table app/allreduce (bytes i8, iter i4, ns i8: the call, work_ns i8: the compute
before it), one row per timed call, sizes in the order given, streamed as the calls are made; attrs of app: name, sizes,
iterations, warmup, work_quantum_ns, verified.
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

ROW_DTYPE = np.dtype([("bytes", "i8"), ("iter", "i4"), ("ns", "i8"), ("work_ns", "i8")])
ITEM = 8  # float64


def parse(argv: list[str]) -> tuple[appkit.AppParser, argparse.Namespace]:
    p = appkit.parser("allreduce", __doc__)
    p.add_argument("--sizes", type=appkit.byte_sizes, default=(8, 64, 512, 4096, 32768, 262144, 1 << 20),
                   help="message sizes in bytes, multiples of 8 [8,64,512,4K,32K,256K,1M]")
    p.add_argument("--iterations", type=appkit.positive_int, default=1000,
                   help="timed calls per size [1000]")
    p.add_argument("--warmup", type=appkit.nonnegative_int, default=20,
                   help="untimed calls per size before them [20]")
    p.add_argument("--work-us", type=appkit.nonnegative_float, default=0.0,
                   help="compute quantum before each call, in us [0]")
    args = p.parse_args(argv)
    odd = [s for s in args.sizes if s % ITEM]
    if odd:
        p.error(f"--sizes: {odd[0]} bytes is not a whole number of float64 elements (8 bytes)")
    return p, args


def main(argv: list[str] | None = None) -> None:
    p, args = parse(sys.argv[1:] if argv is None else argv)
    ctx = mckmpi.context()
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    inj = appkit.injector(args, p, comm)
    mem = ctx.mem
    largest = max(args.sizes) // ITEM
    send = mem.full(largest, float(rank + 1))
    recv = mem.zeros(largest)
    n = args.iterations
    rows = len(args.sizes) * n
    # One row per timed call, streamed into the run file as the calls are made.
    table = mem.zeros(rows, dtype=ROW_DTYPE)
    table["bytes"] = np.repeat(np.asarray(args.sizes, dtype=np.int64), n)
    table["iter"] = np.tile(np.arange(n, dtype=np.int32), len(args.sizes))
    call_ns, work_ns = table["ns"], table["work_ns"]
    done = ctx.tracer.stream("app", "allreduce", table,
                             units={"bytes": "B", "ns": "ns", "work_ns": "ns"})
    kernel = appkit.WorkKernel(mem)
    run = kernel.runner(inj)
    quantum_ns = round(args.work_us * 1000)
    reps = 0
    if quantum_ns:
        unit_ns = comm.allreduce(kernel.unit_ns(run), op=MPI.MIN)
        reps = appkit.reps_for(quantum_ns, unit_ns)
    expected = size * (size + 1) / 2
    ok = True

    def measure() -> None:
        nonlocal ok
        c = clock
        allreduce, op = comm.Allreduce, MPI.SUM
        inj.start(comm)
        for s, nbytes in enumerate(args.sizes):
            sb, rb = send[:nbytes // ITEM], recv[:nbytes // ITEM]
            for _ in range(args.warmup):
                allreduce(sb, rb, op=op)
            comm.Barrier()
            base = s * n
            for i in range(base, base + n):
                t0 = c()
                if reps:
                    run(reps)
                elif t0 >= inj.due:
                    inj.fire()
                t1 = c()
                allreduce(sb, rb, op=op)
                t2 = c()
                work_ns[i] = t1 - t0
                call_ns[i] = t2 - t1
                done.filled = i + 1
            ok = ok and bool(np.all(rb == expected))
            rb.fill(0)
        inj.stop()

    appkit.run_phases(ctx, measure)
    verified = comm.allreduce(ok, op=MPI.LAND)
    tracer = ctx.tracer
    tracer.attrs("app", name="allreduce", sizes=np.asarray(args.sizes, dtype=np.int64), iterations=n,
                 warmup=args.warmup, work_quantum_ns=quantum_ns, verified=verified)
    inj.record(tracer)
    if rank == 0:
        lines = [f"allreduce: {counted(size, 'rank')}, {counted(n, 'call')} per size"
                 + (f" after {quantum_ns} ns of work each" if quantum_ns else "")
                 + ", rank 0 latency median / p99 / max:"]
        for s, nbytes in enumerate(args.sizes):
            t = call_ns[s * n:(s + 1) * n]
            lines.append(f"  {nbytes:>9} B  {np.median(t) / 1e3:9.1f} us "
                         f"{np.percentile(t, 99) / 1e3:9.1f} us {t.max() / 1e3:9.1f} us")
        print("\n".join(lines) + ("" if verified else "\nallreduce: FAILED"))
    appkit.verify_all(comm, verified, f"allreduce returned a wrong sum (expected {expected:g} everywhere)")


if __name__ == "__main__":
    main()
