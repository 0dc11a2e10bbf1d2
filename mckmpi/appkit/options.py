"""App options: every rank validates the same options the same way before any
communication; rank 0 alone prints the one-line error and every rank exits with status 2,
so an app can never hang when it rejects its options."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from mckmpi.errors import UsageError
from mckmpi.utility.units import parse_cpulist, parse_size


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


def checked_number(text: str, kind: Callable[[str], Any], what: str, ok: Callable[[Any], bool]) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return checked_number(text, int, "a positive integer", lambda v: v > 0)


def nonnegative_int(text: str) -> int:
    return checked_number(text, int, "a non-negative integer", lambda v: v >= 0)


def positive_float(text: str) -> float:
    return checked_number(text, float, "a positive number", lambda v: math.isfinite(v) and v > 0)


def nonnegative_float(text: str) -> float:
    return checked_number(text, float, "a non-negative number", lambda v: math.isfinite(v) and v >= 0)


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
    return tuple(checked_number(s, int, "positive integers like 512 or 512x256", lambda v: v > 0)
                 for s in parts)


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
    freq = checked_number(parts[0], float, "a positive frequency in Hz", lambda v: math.isfinite(v) and v > 0)
    dur_us = checked_number(parts[1], float, "a positive duration in us", lambda v: math.isfinite(v) and v > 0)
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
