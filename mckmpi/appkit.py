"""What the apps in apps/ share: options, clocks, the work kernel, noise injection, grids.

Every app runs under the harness (`mckmpi run -- apps/X.py`) and bare (`mpiexec -n 2
python apps/X.py`). So that an app can never hang when it rejects its options, every rank
validates the same options the same way before any communication, rank 0 alone prints the
one-line error, and every rank exits with status 2. Checks that need a measurement (a
quantum below the timer's resolution) combine the measurements of all ranks first, so the
verdict is still the same everywhere.

Timed loops allocate nothing: buffers come from `ctx.mem` (the LWK arena in lwk mode) before
the loop, the work is numpy kernels writing into preallocated outputs, and times are int64
nanoseconds of CLOCK_MONOTONIC (`clock`), the clock of the run file.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np

from mckmpi.errors import UsageError
from mckmpi.utility.units import parse_cpulist, parse_size

#: The clock of every app timestamp: CLOCK_MONOTONIC in int64 ns (as the run file).
clock = time.monotonic_ns
#: A time that never comes (an idle noise injector's next due time).
NEVER = 1 << 62
#: The smallest work quantum an app accepts, whatever the timer could resolve.
MIN_QUANTUM_NS = 10_000
#: ... and it must span this many steps of the clock.
QUANTUM_PER_STEP = 50
#: Elements of the work kernel's array: 16 KiB of float64 stays in L1/L2, so a unit of
#: work is compute, not memory traffic, and costs the same on every rank.
KERNEL_ELEMENTS = 2048


# --- options -------------------------------------------------------------------------------

def world_rank() -> int:
    """This process's rank in COMM_WORLD (0 before MPI is up)."""
    from mpi4py import MPI

    if MPI.Is_initialized() and not MPI.Is_finalized():
        return MPI.COMM_WORLD.Get_rank()
    return 0


class AppParser(argparse.ArgumentParser):
    """argparse for MPI apps: rank 0 alone speaks, and an error is one line and exit 2."""

    def error(self, message: str) -> NoReturn:
        if world_rank() == 0:
            print(f"{self.prog}: error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)

    def print_help(self, file: Any = None) -> None:
        if world_rank() == 0:
            super().print_help(file)

    def print_usage(self, file: Any = None) -> None:
        if world_rank() == 0:
            super().print_usage(file)


def parser(prog: str, doc: str | None) -> AppParser:
    """An app's parser, with the options every app has (noise injection)."""
    p = AppParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    noise = p.add_argument_group("noise injection")
    noise.add_argument(
        "--inject-noise", metavar="FREQ_HZ:DURATION_US[:RANKS]", type=noise_spec,
        help="selected ranks (default all; e.g. 0,2-3) lose DURATION_US of CPU every 1/FREQ_HZ s, "
             "busy-spinning at the first check of the clock after each due time (checks happen "
             "between the app's work units, so that unit is the placement granularity)")
    noise.add_argument("--inject-sync", action="store_true",
                       help="align the injected detours of all ranks (default: each rank has its own phase)")
    return p


def _number(text: str, kind: Callable[[str], Any], what: str, ok: Callable[[Any], bool]) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, "a positive integer", lambda v: v > 0)


def nonnegative_int(text: str) -> int:
    return _number(text, int, "a non-negative integer", lambda v: v >= 0)


def positive_float(text: str) -> float:
    return _number(text, float, "a positive number", lambda v: math.isfinite(v) and v > 0)


def nonnegative_float(text: str) -> float:
    return _number(text, float, "a non-negative number", lambda v: math.isfinite(v) and v >= 0)


def byte_size(text: str) -> int:
    """Bytes from '8', '4K', '1M' (binary units)."""
    try:
        return parse_size(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def byte_sizes(text: str) -> tuple[int, ...]:
    """A comma-separated list of byte sizes: '8,64,4K,1M'."""
    parts = [s for s in text.split(",") if s.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("needs at least one size")
    return tuple(byte_size(s) for s in parts)


def shape(text: str) -> tuple[int, ...]:
    """Grid points per axis: '512' (every axis) or '512x256[x128]'."""
    parts = text.lower().split("x")
    return tuple(_number(s, int, "positive integers like 512 or 512x256", lambda v: v > 0)
                 for s in parts)


# --- clocks --------------------------------------------------------------------------------

@dataclass(frozen=True)
class TimerStats:
    """What one reading of `clock` costs and the smallest step it can show."""

    cost_ns: int
    resolution_ns: int  # smallest step between two distinct reads (never below a read's cost)

    @property
    def min_quantum_ns(self) -> int:
        """The shortest interval worth timing: a sample is off by about one step of the clock
        (at least one read's cost), and 50 times that keeps the error within 2 %."""
        return max(MIN_QUANTUM_NS, QUANTUM_PER_STEP * max(self.cost_ns, self.resolution_ns))

    def check_quantum(self, p: argparse.ArgumentParser, option: str, value_us: float) -> int:
        """`value_us` in ns, or one clear line and exit 2 when it is below the resolution."""
        ns = round(value_us * 1000)
        if ns < self.min_quantum_ns:
            p.error(f"{option} {value_us:g} is below the benchmark's resolution: the shortest "
                    f"is {self.min_quantum_ns / 1000:g} us (a clock read costs {self.cost_ns} ns, "
                    f"its resolution is {self.resolution_ns} ns)")
        return ns


def measure_timer(reads: int = 20_000, trials: int = 5) -> TimerStats:
    """Cost of a clock read (fastest of a few loops of reads) and its resolution."""
    c = clock
    cost = NEVER
    for _ in range(trials):
        t0 = c()
        for _ in range(reads):
            c()
        cost = min(cost, (c() - t0) // reads)
    step = NEVER
    for _ in range(2000):
        a = b = c()
        while b == a:
            b = c()
        step = min(step, b - a)
    return TimerStats(int(cost), int(step))


def agreed_timer(comm: Any, stats: TimerStats) -> TimerStats:
    """The worst timer of all ranks, so every rank applies the same limits."""
    from mpi4py import MPI

    cost = comm.allreduce(stats.cost_ns, op=MPI.MAX)
    step = comm.allreduce(stats.resolution_ns, op=MPI.MAX)
    return TimerStats(cost, step)


# --- the unit of work ----------------------------------------------------------------------

class WorkKernel:
    """A fixed unit of compute: `np.sqrt` over a cache-resident array, written in place.

    One unit is one ufunc call, so the interpreter's share is a small, constant part of it
    and nothing is allocated. With an injector, the clock is checked after every unit.
    """

    def __init__(self, mem: Any, elements: int = KERNEL_ELEMENTS) -> None:
        self.elements = elements
        self.x = mem.full(elements, 2.0)
        self.y = mem.empty(elements)

    def run(self, reps: int) -> None:
        x, y, sqrt = self.x, self.y, np.sqrt
        for _ in range(reps):
            sqrt(x, out=y)

    def run_injected(self, reps: int, injector: Injector) -> None:
        x, y, sqrt, c = self.x, self.y, np.sqrt, clock
        for _ in range(reps):
            sqrt(x, out=y)
            if c() >= injector.due:
                injector.fire()

    def runner(self, injector: Injector) -> Callable[[int], None]:
        """The loop to time: the plain one, or the one that checks the clock per unit."""
        if injector.active:
            return lambda reps: self.run_injected(reps, injector)
        return self.run

    def unit_ns(self, run: Callable[[int], None], min_batch_ns: int = 50_000,
                trials: int = 21, min_total_ns: int = 200_000_000) -> float:
        """Fastest time of one unit through `run`, from batches long enough to time well,
        repeated for at least `min_total_ns`: a core's speed drifts (frequency ramps, a
        virtual CPU's host), and a unit timed in a slow moment makes every sample short."""
        batch = 1
        while True:
            t0 = clock()
            run(batch)
            if clock() - t0 >= min_batch_ns or batch >= 1 << 20:
                break
            batch *= 2
        best = NEVER
        started = clock()
        done = 0
        while done < trials or clock() - started < min_total_ns:
            t0 = clock()
            run(batch)
            best = min(best, clock() - t0)
            done += 1
        return best / batch

    def verify(self) -> bool:
        """The kernel computed what it should (sqrt(2) everywhere)."""
        return bool(np.allclose(self.y, math.sqrt(2.0), rtol=1e-15, atol=0))


def reps_for(quantum_ns: int, unit_ns: float) -> int:
    """Units of work that take at least `quantum_ns` on a quiet core."""
    return max(1, math.ceil(quantum_ns / unit_ns))


# --- noise injection -----------------------------------------------------------------------

#: How far ahead of rank 0's clock the injectors of all ranks start counting.
START_MARGIN_NS = 1_000_000
#: The golden ratio's fraction: rank r's unsynchronised phase is frac((r + 1) * GOLDEN) of a
#: period, so phases are distinct, well spread and the same in every run.
GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


@dataclass(frozen=True)
class NoiseSpec:
    """`--inject-noise FREQ_HZ:DURATION_US[:RANKS]`."""

    freq_hz: float
    duration_ns: int
    ranks: tuple[int, ...] | None  # None: every rank

    @property
    def period_ns(self) -> int:
        return round(1e9 / self.freq_hz)

    def text(self) -> str:
        ranks = "all" if self.ranks is None else ",".join(map(str, self.ranks))
        return f"{self.freq_hz:g}:{self.duration_ns / 1000:g}:{ranks}"


def noise_spec(text: str) -> NoiseSpec:
    """Parse FREQ_HZ:DURATION_US[:RANKS] (RANKS like 0,2-3 or 'all')."""
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"expected FREQ_HZ:DURATION_US[:RANKS], got {text!r}")
    freq = _number(parts[0], float, "a positive frequency in Hz", lambda v: math.isfinite(v) and v > 0)
    dur_us = _number(parts[1], float, "a positive duration in us", lambda v: math.isfinite(v) and v > 0)
    ranks: tuple[int, ...] | None = None
    if len(parts) == 3 and parts[2] not in ("", "all"):
        try:
            ranks = parse_cpulist(parts[2])
        except UsageError:
            raise argparse.ArgumentTypeError(f"ranks must look like 0,2-3 or all, got {parts[2]!r}") from None
    spec = NoiseSpec(freq, round(dur_us * 1000), ranks)
    if spec.duration_ns >= spec.period_ns:
        raise argparse.ArgumentTypeError(
            f"a {dur_us:g} us detour every {spec.period_ns / 1000:g} us leaves no time to compute")
    return spec


def check_noise_ranks(p: AppParser, spec: NoiseSpec | None, size: int) -> None:
    """Reject injection on ranks the job does not have (same verdict on every rank)."""
    if spec is not None and spec.ranks is not None and max(spec.ranks) >= size:
        p.error(f"--inject-noise: rank {max(spec.ranks)} does not exist in a job of {size} ranks")


class Injector:
    """Synthetic noise: the selected ranks busy-spin `duration` every `period`.

    Driven by clock checks between the app's work units (no signal, no thread): the app
    compares a time it read with `due` and calls `fire()` when it has passed. A detour thus
    starts up to one work unit late; when a check comes after several due times, all owed
    detours are taken at once, so the CPU stolen over a run stays FREQ x DURATION per second.
    """

    def __init__(self, spec: NoiseSpec | None, rank: int, sync: bool) -> None:
        self.spec = spec
        self.sync = sync
        self.active = spec is not None and (spec.ranks is None or rank in spec.ranks)
        self.due = NEVER
        self.period_ns = spec.period_ns if spec is not None else 0
        self.duration_ns = spec.duration_ns if spec is not None else 0
        self.phase_ns = self.period_ns if sync else int(((rank + 1) * GOLDEN) % 1.0 * self.period_ns)
        self.stolen_ns = 0
        self.count = 0

    def start(self, comm: Any) -> int:
        """Collective: the first detour is one phase after an instant common to all ranks;
        returns that instant on this rank's clock (apps may start their own clock there).

        The instant is rank 0's clock shortly ahead, mapped onto each rank's clock with the
        offset of the quickest of a few ping-pongs, so a rank that left a barrier late (its
        core was busy) is still aligned to the others within a round trip.
        """
        from mckmpi.trace.clock import measure_offsets

        offset_ns, _ = measure_offsets(comm)
        epoch = comm.bcast(clock() + START_MARGIN_NS if comm.Get_rank() == 0 else None, root=0)
        epoch -= offset_ns
        if self.active:
            self.due = epoch + self.phase_ns
        return epoch

    def stop(self) -> None:
        self.due = NEVER

    def fire(self) -> None:
        """Take every detour that is due now, as one spin."""
        now = clock()
        owed = (now - self.due) // self.period_ns + 1
        end = now + owed * self.duration_ns
        t = now
        while t < end:
            t = clock()
        self.stolen_ns += t - now
        self.count += owed
        self.due += owed * self.period_ns

    def record(self, tracer: Any) -> None:
        if self.spec is None:
            return
        tracer.attrs("noise", injected=self.spec.text(), injected_sync=self.sync)
        tracer.scalar("noise", "injected_ns", self.stolen_ns, units="ns")
        tracer.scalar("noise", "injected_count", self.count, units="count")


def injector(args: argparse.Namespace, p: AppParser, comm: Any) -> Injector:
    """The injector the options ask for (inactive when none was asked for)."""
    check_noise_ranks(p, args.inject_noise, comm.Get_size())
    return Injector(args.inject_noise, comm.Get_rank(), args.inject_sync)


# --- Cartesian grids -----------------------------------------------------------------------

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


# --- checks, records, running --------------------------------------------------------------

class VerificationError(RuntimeError):
    """The app's numerical result is wrong: a failed run, not a usage error."""


def verify_all(comm: Any, ok: bool, message: str) -> None:
    """Raise on every rank if the check failed on any (so no rank waits for another)."""
    from mpi4py import MPI

    if not comm.allreduce(bool(ok), op=MPI.LAND):
        raise VerificationError(message)


def record_phases(tracer: Any, n: int, iter_ns: np.ndarray, compute_ns: np.ndarray,
                  comm_ns: np.ndarray) -> None:
    """The per-iteration times every mini-app records ([iterations] int64 ns per rank)."""
    tracer.array("app", "iter_ns", iter_ns[:n], units="ns")
    tracer.array("app", "compute_ns", compute_ns[:n], units="ns")
    tracer.array("app", "comm_ns", comm_ns[:n], units="ns")


def ms(ns: float) -> str:
    return f"{ns / 1e6:.3f} ms"


def run_phases(ctx: Any, fn: Callable[[], Any]) -> Any:
    """Run the app's measured phases as a task of the rank's scheduler when it has one.

    In lwk mode this is where the cooperative scheduler takes over the rank's thread; in
    linux mode and bare the phases simply run.
    """
    sched = ctx.scheduler
    if sched is None:
        return fn()
    from mckmpi.lwk.scheduler import current_task

    try:
        current_task()
    except RuntimeError:
        return sched.run(fn)
    return fn()  # already inside a task of the scheduler
