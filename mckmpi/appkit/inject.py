"""Synthetic noise injection for sensitivity studies: detours of a given length, period
and ranks, placed deterministically (golden-ratio phases) so runs are comparable."""

from __future__ import annotations

import argparse
import math
from typing import Any

from mckmpi.appkit.options import AppParser, NoiseSpec, check_noise_ranks
from mckmpi.appkit.timing import NEVER, clock

#: How far ahead of rank 0's clock the injectors of all ranks start counting.
START_MARGIN_NS = 1_000_000
#: The golden ratio's fraction: rank r's unsynchronised phase is frac((r + 1) * GOLDEN) of a
#: period, so phases are distinct, well spread and the same in every run.
GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


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
