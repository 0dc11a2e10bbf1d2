"""CG: matrix-free conjugate gradient on the 3D 7-point Laplacian (an HPCG-like mini-app).

Solves A x = b, A the 7-point Laplacian with zero Dirichlet boundaries, on a grid split over
a Cartesian communicator. Each iteration exchanges the halo of the search direction
(neighbour messages), applies A, and needs two allreduces (p.Ap and r.r): the pattern that
makes CG sensitive to noise at scale.

Manufactured solution: x* is a smooth function of the global indices times a sum of
oscillations, zero on the boundary; b = A x* is computed on each rank from x* at its own
points and its neighbours' (evaluated, not exchanged), so a wrong halo exchange makes CG
solve a different system and fail the check. Verified when the true relative residual
|b - Ax| / |b| is within 10x the tolerance and the error |x - x*| / |x*| is within the bound
cond(A) * residual that holds for any x.

Records: app/iter_ns, app/compute_ns, app/comm_ns (the two allreduces), app/halo_ns
[ranks, iterations] int64 ns (streamed while the app runs); scalars app/residual,
app/error; attrs of app: name, scaling, global_size, local_size, process_grid, iterations,
tolerance, converged, verified, error.
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


def parse(argv: list[str]) -> tuple[appkit.AppParser, argparse.Namespace]:
    p = appkit.parser("cg", __doc__)
    p.add_argument("--tol", type=appkit.positive_float, default=1e-8,
                   help="stop when |r| / |b| is below this [1e-8]")
    p.add_argument("--max-iter", type=appkit.positive_int, default=2000,
                   help="give up (and fail) after this many iterations [2000]")
    appkit.add_grid_options(p, local_default="32", size_default="64")
    return p, p.parse_args(argv)


def condition_number(shape: tuple[int, ...]) -> float:
    """Exact cond(A) of the Dirichlet 7-point Laplacian: lambda_max / lambda_min."""
    lo = sum(2 - 2 * math.cos(math.pi / (n + 1)) for n in shape)
    hi = sum(2 - 2 * math.cos(n * math.pi / (n + 1)) for n in shape)
    return hi / lo


def manufactured(g: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """x* at global indices `g`: zero on the boundary, with many eigencomponents."""
    envelope = math.prod(np.sin(np.pi * g[a] / (shape[a] + 1)) for a in range(3))
    return envelope * (1.0 + 0.5 * np.cos(0.9 * g[0] + 1.7 * g[1] + 2.3 * g[2]))


class Laplacian:
    """out = A p on the interior of the ghosted `p`, with views made once."""

    def __init__(self, p: np.ndarray) -> None:
        self.centre = p[1:-1, 1:-1, 1:-1]
        self.nbrs = [p[tuple(slice(1 + d, p.shape[b] - 1 + d) if b == a else slice(1, -1)
                             for b in range(3))]
                     for a in range(3) for d in (-1, 1)]

    def apply(self, out: np.ndarray) -> None:
        np.multiply(self.centre, 6.0, out=out)
        for nb in self.nbrs:
            np.subtract(out, nb, out=out)


def main(argv: list[str] | None = None) -> None:
    p, args = parse(sys.argv[1:] if argv is None else argv)
    ctx = mckmpi.context()
    comm = MPI.COMM_WORLD
    grid = appkit.plan_grid(p, args, 3, comm.Get_size(), min_points=4,
                            local_default=32, size_default=64)
    inj = appkit.injector(args, p, comm)
    cart = comm.Create_cart(list(grid.dims), periods=[False] * 3, reorder=False)
    coords = cart.Get_coords(cart.Get_rank())
    local = grid.local_shape
    mem = ctx.mem

    pg = mem.zeros(tuple(n + 2 for n in local))       # search direction, with ghosts
    x, r, ap, b, tmp = (mem.zeros(local) for _ in range(5))
    A = Laplacian(pg)
    pi = A.centre
    xstar = manufactured(appkit.global_coords(grid, coords), grid.global_shape)
    pg[...] = xstar
    A.apply(b)                                         # b = A x*, no exchange involved
    for a in range(3):                                 # ghosts the halo must fill: NaN
        lower, upper = cart.Shift(a, 1)
        for peer, layer in ((lower, 0), (upper, local[a] + 1)):
            pg[tuple(layer if c == a else slice(None) for c in range(3))] = (
                np.nan if peer != MPI.PROC_NULL else 0.0)
    halo = appkit.Halo(cart, [pg], mem)
    rf = r.reshape(-1)
    loc, glob = mem.zeros(1), mem.zeros(1)
    cap = args.max_iter
    iter_ns, compute_ns, comm_ns, halo_ns = (mem.zeros(cap, dtype=np.int64) for _ in range(4))
    times = appkit.stream_phases(ctx.tracer, iter_ns, compute_ns, comm_ns, halo_ns=halo_ns)

    def allreduce_dot(u: np.ndarray, v: np.ndarray) -> float:
        np.multiply(u, v, out=tmp)
        loc[0] = tmp.sum()
        cart.Allreduce(loc, glob, op=MPI.SUM)
        return float(glob[0])

    bb = allreduce_dot(b, b)
    stop = args.tol ** 2 * bb
    iterations = 0
    converged = False

    def solve() -> None:
        nonlocal iterations, converged
        c = clock
        r[...] = b
        pi[...] = r
        rr = bb
        inj.start(cart)
        for k in range(cap):
            t0 = c()
            halo.exchange(0)
            t1 = c()
            A.apply(ap)
            np.multiply(pi, ap, out=tmp)
            loc[0] = tmp.sum()
            t2 = c()
            if t2 >= inj.due:
                inj.fire()
                t2 = c()
            cart.Allreduce(loc, glob, op=MPI.SUM)
            t3 = c()
            alpha = rr / glob[0]
            np.multiply(pi, alpha, out=tmp)
            np.add(x, tmp, out=x)
            np.multiply(ap, alpha, out=tmp)
            np.subtract(r, tmp, out=r)
            loc[0] = np.dot(rf, rf)
            t4 = c()
            cart.Allreduce(loc, glob, op=MPI.SUM)
            t5 = c()
            rr_new = glob[0]
            np.multiply(pi, rr_new / rr, out=pi)
            np.add(pi, r, out=pi)
            rr = rr_new
            t6 = c()
            iter_ns[k] = t6 - t0
            halo_ns[k] = t1 - t0
            comm_ns[k] = t3 - t2 + t5 - t4
            compute_ns[k] = t2 - t1 + t4 - t3 + t6 - t5
            times.filled = k + 1
            if rr <= stop:
                iterations, converged = k + 1, True
                return
        iterations = cap

    appkit.run_phases(ctx, solve)
    inj.stop()
    # The true residual b - A x and the error against x*, from scratch.
    pi[...] = x
    halo.exchange(0)
    halo.free()
    A.apply(ap)
    np.subtract(b, ap, out=r)
    residual = math.sqrt(allreduce_dot(r, r) / bb)
    np.subtract(x, xstar[1:-1, 1:-1, 1:-1], out=r)
    err2 = allreduce_dot(r, r)
    np.copyto(tmp, xstar[1:-1, 1:-1, 1:-1])
    error = math.sqrt(err2 / allreduce_dot(tmp, tmp))
    kappa = condition_number(grid.global_shape)
    verified = bool(converged and residual <= 10 * args.tol and error <= 1.01 * kappa * residual)
    n = iterations
    tracer = ctx.tracer
    tracer.scalar("app", "residual", residual)
    tracer.scalar("app", "error", error)
    tracer.attrs("app", name="cg", scaling=grid.scaling, global_size=grid.text(grid.global_shape),
                 local_size=grid.text(local), process_grid=grid.text(grid.dims), iterations=n,
                 tolerance=args.tol, converged=converged, verified=verified, error=error)
    inj.record(tracer)
    if cart.Get_rank() == 0:
        print(f"cg: {grid.scaling} scaling, {counted(cart.Get_size(), 'rank')} "
              f"({grid.text(grid.dims)}), global {grid.text(grid.global_shape)}: "
              f"{counted(n, 'iteration')}, residual {residual:.2e}, "
              f"error {error:.2e} (cond {kappa:.0f}); median iteration "
              f"{appkit.ms(np.median(iter_ns[:n]))} (compute {appkit.ms(np.median(compute_ns[:n]))}, "
              f"allreduce {appkit.ms(np.median(comm_ns[:n]))}, halo "
              f"{appkit.ms(np.median(halo_ns[:n]))}), {'verified' if verified else 'FAILED'}")
    appkit.verify_all(cart, verified, f"cg did not solve the system: {n} iterations, residual "
                                      f"{residual:.3e} (tolerance {args.tol:g}), error {error:.3e}")


if __name__ == "__main__":
    main()
