"""Stencil: Jacobi sweeps of the Laplace equation on a 2D or 3D grid (halo-exchange mini-app).

The grid is split over a Cartesian communicator; every iteration exchanges one ghost layer
with the neighbours (non-blocking, persistent requests) while the points that do not need
it are updated, then waits for the halo and updates the rest. Weak scaling keeps --local
points per rank; strong scaling divides a fixed --size grid among the ranks (a grid that does
not divide is a usage error).

Verification against a known solution: the initial field is a discrete-harmonic linear
function (the Dirichlet boundary values, which Jacobi leaves unchanged) plus a product of
sines, an eigenvector of the Jacobi iteration with eigenvalue
lambda = mean_a cos(k_a pi / (N_a + 1)). After n sweeps the field must equal
steady + lambda^n * mode to rounding, on every point of every rank. Ghosts on rank
boundaries start as NaN, so a missing or misplaced halo cannot pass.

Records: app/iter_ns, app/compute_ns, app/comm_ns [ranks, iterations] int64 ns (comm = halo
start plus halo wait; streamed while the app runs); app/error (max relative error); attrs
of app: name, ndim, scaling, global_size, local_size, process_grid, iterations, warmup,
verified, error.
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np
from mpi4py import MPI

import mckmpi
from mckmpi import appkit
from mckmpi.appkit import clock
from mckmpi.utility.table import counted

LOCAL_DEFAULT = {2: 512, 3: 64}
SIZE_DEFAULT = {2: 1024, 3: 128}
MODES = (1, 2, 3)          # wave number of the decaying eigenmode along each axis
SLOPES = (1.0, 2.0, 3.0)   # the steady linear field along each axis
TOLERANCE = 1e-9           # relative to the steady field's maximum


def parse(argv: list[str]) -> tuple[appkit.AppParser, argparse.Namespace]:
    p = appkit.parser("stencil", __doc__)
    p.add_argument("--ndim", type=int, choices=(2, 3), default=2, help="2D or 3D grid [2]")
    p.add_argument("--iterations", type=appkit.positive_int, default=200,
                   help="timed iterations [200]")
    p.add_argument("--warmup", type=appkit.nonnegative_int, default=10,
                   help="untimed iterations before them [10]")
    appkit.add_grid_options(p, local_default="2D: 512, 3D: 64", size_default="2D: 1024, 3D: 128")
    return p, p.parse_args(argv)


def regions(local: tuple[int, ...]) -> tuple[tuple[slice, ...], list[tuple[slice, ...]]]:
    """The points that need no ghost (interior) and a partition of the rest (the shell).

    Indices are those of the ghosted array (points 1..n). Slab a holds the first and last
    layer along axis a, restricted to the interior along the axes before a.
    """
    interior = tuple(slice(2, n) for n in local)
    shell = []
    for a, n in enumerate(local):
        for layer in sorted({1, n}):
            shell.append(tuple(slice(layer, layer + 1) if b == a else
                               slice(2, m) if b < a else slice(1, m + 1)
                               for b, m in enumerate(local)))
    return interior, shell


def jacobi_ops(src: np.ndarray, dst: np.ndarray, region_list: list[tuple[slice, ...]]
               ) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """Views for dst[region] = mean of the 2*ndim neighbours in src, built once."""
    ops = []
    for reg in region_list:
        nbrs = []
        for a in range(len(reg)):
            for d in (-1, 1):
                nbrs.append(src[tuple(slice(s.start + d, s.stop + d) if b == a else s
                                      for b, s in enumerate(reg))])
        ops.append((dst[reg], nbrs))
    return ops


def sweep(ops: list[tuple[np.ndarray, list[np.ndarray]]], scale: float) -> None:
    add, mul = np.add, np.multiply
    for out, nbrs in ops:
        add(nbrs[0], nbrs[1], out=out)
        for nb in nbrs[2:]:
            add(out, nb, out=out)
        mul(out, scale, out=out)


def main(argv: list[str] | None = None) -> None:
    p, args = parse(sys.argv[1:] if argv is None else argv)
    ctx = mckmpi.context()
    comm = MPI.COMM_WORLD
    ndim = args.ndim
    grid = appkit.plan_grid(p, args, ndim, comm.Get_size(), min_points=8,
                            local_default=LOCAL_DEFAULT[ndim], size_default=SIZE_DEFAULT[ndim])
    inj = appkit.injector(args, p, comm)
    cart = comm.Create_cart(list(grid.dims), periods=[False] * ndim, reorder=False)
    coords = cart.Get_coords(cart.Get_rank())
    local = grid.local_shape

    # The known solution, from global indices: steady linear field + one Jacobi eigenmode.
    g = appkit.global_coords(grid, coords)
    big = [n + 1 for n in grid.global_shape]
    steady = sum(SLOPES[a] * g[a] / big[a] for a in range(ndim))
    mode = math.prod(np.sin(MODES[a] * np.pi * g[a] / big[a]) for a in range(ndim))
    lam = sum(math.cos(MODES[a] * math.pi / big[a]) for a in range(ndim)) / ndim
    u = ctx.mem.empty(tuple(n + 2 for n in local))
    v = ctx.mem.empty_like(u)
    u[...] = steady + mode
    for a in range(ndim):
        lower, upper = cart.Shift(a, 1)
        for peer, layer in ((lower, 0), (upper, local[a] + 1)):
            if peer != MPI.PROC_NULL:
                u[tuple(layer if b == a else slice(None) for b in range(ndim))] = np.nan
    v[...] = u

    halo = appkit.Halo(cart, [u, v], ctx.mem)
    interior, shell = regions(local)
    steps = ((0, jacobi_ops(u, v, [interior]), jacobi_ops(u, v, shell)),
             (1, jacobi_ops(v, u, [interior]), jacobi_ops(v, u, shell)))
    scale = 1.0 / (2 * ndim)
    n = args.iterations
    iter_ns = ctx.mem.zeros(n, dtype=np.int64)
    compute_ns = ctx.mem.zeros(n, dtype=np.int64)
    comm_ns = ctx.mem.zeros(n, dtype=np.int64)
    times = appkit.stream_phases(ctx.tracer, iter_ns, compute_ns, comm_ns)
    total = args.warmup + n

    def measure() -> None:
        c = clock
        inj.start(cart)
        for it in range(total):
            src, inner, outer = steps[it & 1]
            t0 = c()
            halo.start(src)
            t1 = c()
            sweep(inner, scale)
            t2 = c()
            if t2 >= inj.due:
                inj.fire()
                t2 = c()
            halo.finish(src)
            t3 = c()
            sweep(outer, scale)
            t4 = c()
            k = it - args.warmup
            if k >= 0:
                iter_ns[k] = t4 - t0
                compute_ns[k] = t2 - t1 + t4 - t3
                comm_ns[k] = t1 - t0 + t3 - t2
                times.filled = k + 1
        inj.stop()

    appkit.run_phases(ctx, measure)
    halo.free()
    final = u if total % 2 == 0 else v
    inner = tuple(slice(1, m + 1) for m in local)
    expected = steady + lam ** total * mode
    err = float(np.max(np.abs(final[inner] - expected[inner]))) / float(np.max(np.abs(steady)))
    err = cart.allreduce(err if not math.isnan(err) else math.inf, op=MPI.MAX)
    verified = err <= TOLERANCE
    tracer = ctx.tracer
    tracer.scalar("app", "error", err)
    tracer.attrs("app", name="stencil", ndim=ndim, scaling=grid.scaling,
                 global_size=grid.text(grid.global_shape), local_size=grid.text(local),
                 process_grid=grid.text(grid.dims), iterations=n, warmup=args.warmup,
                 verified=verified, error=err)
    inj.record(tracer)
    slowest = cart.reduce(float(np.median(iter_ns)), op=MPI.MAX, root=0)
    floor = cart.reduce(int(iter_ns.min()), op=MPI.MAX, root=0)
    if cart.Get_rank() == 0:
        print(f"stencil: {ndim}D {grid.scaling} scaling, {counted(cart.Get_size(), 'rank')} "
              f"({grid.text(grid.dims)}), global {grid.text(grid.global_shape)}, "
              f"{counted(n, 'iteration')}: "
              f"median iteration {appkit.ms(np.median(iter_ns))} on rank 0 (compute "
              f"{appkit.ms(np.median(compute_ns))}, halo {appkit.ms(np.median(comm_ns))}), "
              f"slowest rank {appkit.ms(slowest)}, best iterations up to {appkit.ms(floor)}; "
              f"error {err:.1e}, "
              f"{'verified' if verified else 'FAILED'}")
    appkit.verify_all(cart, verified, f"stencil result is wrong: relative error {err:.3e} "
                                      f"exceeds {TOLERANCE:g}")


if __name__ == "__main__":
    main()
