"""`mckmpi partition reserve|release|status`: a cpuset reservation and the isolation of its LWK
cores, made, shown and undone together.

The cpusets come first (the isolation's load-balancing setting lives in them) and go last:
release restores the isolation, then the cpusets, each from its own state file, so either
can be undone after a crash at any point. Job isolations (`mckmpi run --isolate`) whose
process is gone are restored by any reserve, release or status.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mckmpi.node import cpuset, isolation


@dataclass
class Found:
    """One line of `partition status`: a reservation, an isolation, and what needs a reboot."""

    reservation: cpuset.ReservationStatus | None
    quiet: isolation.Isolation | None

    def describe(self) -> str:
        parts = []
        if self.reservation is not None:
            parts.append(self.reservation.describe())
        if self.quiet is not None:
            parts.append(self.quiet.describe())
            parts.append("  " + isolation.describe_boot(
                isolation.boot_advice(self.quiet.linux_cpus, self.quiet.lwk_cpus)))
        elif self.reservation is not None:
            r = self.reservation.reservation
            parts.append("  not isolated (reserved with --no-isolate); "
                         + isolation.describe_boot(isolation.boot_advice(r.linux_cpus, r.lwk_cpus)))
        return "\n".join(parts)

    def as_dict(self) -> dict[str, Any]:
        quiet = self.quiet
        cpus = (quiet.linux_cpus, quiet.lwk_cpus) if quiet else (
            (self.reservation.reservation.linux_cpus, self.reservation.reservation.lwk_cpus)
            if self.reservation else ((), ()))
        return {"reservation": None if self.reservation is None else self.reservation.as_dict(),
                "isolation": None if quiet is None else quiet.as_dict(),
                "boot": [vars(p) | {"ok": p.ok} for p in isolation.boot_advice(*cpus)]}


def reserve(linux_cpus: tuple[int, ...], lwk_cpus: tuple[int, ...], *, name: str,
            system_wide: bool = False, isolate: bool = True,
            cgroup: int | None = None) -> tuple[cpuset.Reservation, isolation.Isolation | None]:
    """The cpusets, then (unless `isolate` is False) the isolation of the LWK side; a failed
    isolation releases the cpusets again."""
    state_dir = cpuset.default_state_dir()
    isolation.sweep(state_dir)
    r = cpuset.reserve(linux_cpus, lwk_cpus, name=name, system_wide=system_wide,
                       hierarchy=cpuset.detect(cgroup) if cgroup else None)
    if not isolate:
        return r, None
    try:
        quiet = isolation.apply(name, r.linux_cpus, r.lwk_cpus, state_dir=state_dir,
                                cpusets=(r.hierarchy.version, r.hierarchy.mount,
                                         r.parent / r.name, r.path("lwk")))
    except BaseException:
        cpuset.release(name)
        raise
    return r, quiet


def release(name: str) -> list[Any]:
    """Restore the isolation, then release the cpusets; the summaries of both (and of job
    isolations found orphaned)."""
    state_dir = cpuset.default_state_dir()
    out: list[Any] = list(isolation.sweep(state_dir))
    quiet = isolation.restore(name, state_dir=state_dir)
    if quiet.found:
        out.append(quiet)
    out.append(cpuset.release(name))
    return out


def status(name: str | None = None) -> list[Found]:
    """Every reservation with its isolation, and isolations of running jobs."""
    state_dir = cpuset.default_state_dir()
    isolation.sweep(state_dir)
    quiet = {q.name: q for q in isolation.status(state_dir)}
    found = []
    for st in cpuset.status(name):
        found.append(Found(st, quiet.pop(st.reservation.name, None)))
    found += [Found(None, q) for n, q in sorted(quiet.items()) if name is None or n == name]
    return found
