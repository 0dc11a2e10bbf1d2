"""Cartesian process grids and halo exchange for the stencil and CG mini-apps."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mckmpi.appkit.options import AppParser, shape


def add_grid_options(p: AppParser, local_default: str, size_default: str) -> None:
    """--scaling, --local, --size; the defaults are only described here (they may depend on
    other options) and applied by `plan_grid`."""
    g = p.add_argument_group("grid")
    g.add_argument("--scaling", choices=("weak", "strong"), default="weak",
                   help="weak: --local points per rank; strong: a fixed --size grid divided "
                        "among the ranks [weak]")
    g.add_argument("--local", type=shape, default=None,
                   help=f"weak scaling: points per rank per axis, N or NxM[xK] [{local_default}]")
    g.add_argument("--size", type=shape, default=None,
                   help=f"strong scaling: global points per axis, N or NxM[xK] [{size_default}]")


@dataclass(frozen=True)
class Grid:
    """A global grid of interior points split over a Cartesian process grid."""

    scaling: str
    dims: tuple[int, ...]           # process grid
    global_shape: tuple[int, ...]
    local_shape: tuple[int, ...]

    @staticmethod
    def text(s: Sequence[int]) -> str:
        return "x".join(map(str, s))


def plan_grid(p: AppParser, args: argparse.Namespace, ndim: int, nranks: int, min_points: int,
              local_default: int, size_default: int) -> Grid:
    """The grid the options ask for; bad shapes are a usage error on every rank alike."""
    from mpi4py import MPI

    def expand(opt: str, s: tuple[int, ...]) -> tuple[int, ...]:
        if len(s) == 1:
            return s * ndim
        if len(s) != ndim:
            p.error(f"{opt} {Grid.text(s)} has {len(s)} axes, the grid has {ndim}")
        return s

    dims = tuple(MPI.Compute_dims(nranks, [0] * ndim))
    if args.scaling == "weak":
        if args.size is not None:
            p.error("--size sets the global grid of strong scaling; weak scaling takes --local")
        local = expand("--local", args.local or (local_default,))
        glob = tuple(n * d for n, d in zip(local, dims, strict=True))
    else:
        if args.local is not None:
            p.error("--local sets the points per rank of weak scaling; strong scaling takes --size")
        glob = expand("--size", args.size or (size_default,))
        bad = [(n, d) for n, d in zip(glob, dims, strict=True) if n % d]
        if bad:
            n, d = bad[0]
            p.error(f"strong scaling: grid {Grid.text(glob)} does not divide among {nranks} ranks "
                    f"(process grid {Grid.text(dims)}: {n} points over {d})")
        local = tuple(n // d for n, d in zip(glob, dims, strict=True))
    if min(glob) < min_points:
        p.error(f"grid {Grid.text(glob)} is too small: at least {min_points} points per axis")
    return Grid(args.scaling, dims, glob, local)


class Halo:
    """Non-blocking exchange of one ghost layer with the Cartesian neighbours.

    Faces are packed into contiguous buffers and moved with persistent requests made once,
    so an exchange allocates nothing. Ghosts on the domain boundary are never written (they
    keep the boundary values). `arrays` are the ghosted fields that take turns (e.g. the two
    Jacobi buffers); `start(i)`/`finish(i)` exchange the halo of `arrays[i]`.
    """

    def __init__(self, cart: Any, arrays: Sequence[np.ndarray], mem: Any) -> None:
        from mpi4py import MPI

        self._mpi = MPI
        ndim = cart.Get_dim()
        inner = tuple(n - 2 for n in arrays[0].shape)
        self._packs: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in arrays]
        self._unpacks: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in arrays]
        recvs, sends = [], []
        for axis in range(ndim):
            lower, upper = cart.Shift(axis, 1)
            face = inner[:axis] + inner[axis + 1:]
            for side, peer in ((0, lower), (1, upper)):
                if peer == MPI.PROC_NULL:
                    continue
                sbuf, rbuf = mem.empty(face), mem.empty(face)
                # A message moving up the axis has tag 2*axis+1, down 2*axis.
                sends.append(cart.Send_init(sbuf, dest=peer, tag=2 * axis + side))
                recvs.append(cart.Recv_init(rbuf, source=peer, tag=2 * axis + 1 - side))
                own = inner[axis] if side else 1
                ghost = inner[axis] + 1 if side else 0
                for i, a in enumerate(arrays):
                    self._packs[i].append((sbuf, a[_face(ndim, axis, own)]))
                    self._unpacks[i].append((a[_face(ndim, axis, ghost)], rbuf))
        self._requests = recvs + sends

    def start(self, i: int) -> None:
        for buf, face in self._packs[i]:
            np.copyto(buf, face)
        if self._requests:
            self._mpi.Prequest.Startall(self._requests)

    def finish(self, i: int) -> None:
        if self._requests:
            self._mpi.Request.Waitall(self._requests)
        for ghost, buf in self._unpacks[i]:
            np.copyto(ghost, buf)

    def exchange(self, i: int) -> None:
        self.start(i)
        self.finish(i)

    def free(self) -> None:
        for r in self._requests:
            r.Free()
        self._requests = []


def _face(ndim: int, axis: int, index: int) -> tuple[slice | int, ...]:
    """The layer `index` along `axis`, interior points along the others."""
    return tuple(index if a == axis else slice(1, -1) for a in range(ndim))


def global_coords(grid: Grid, coords: Sequence[int]) -> list[np.ndarray]:
    """Global indices of a ghosted local block, one broadcastable array per axis.

    Index 0 and N+1 are the domain boundary, 1..N the interior points.
    """
    ndim = len(grid.global_shape)
    out = []
    for a in range(ndim):
        n = grid.local_shape[a]
        g = np.arange(n + 2, dtype=np.float64) + coords[a] * n
        out.append(g.reshape([-1 if b == a else 1 for b in range(ndim)]))
    return out
