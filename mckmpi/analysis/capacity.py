"""How many ranks one Linux core's proxy serves: a projection from measured numbers.

`mckmpi bench offload` measures the proxy's on-CPU time per small offloaded call with 32
ranks on one proxy core (`capacity.proxy_cpu_per_call_us`). A core then serves
`UTILIZATION / cost` calls per second: the headroom keeps the queue short (at 70 % busy a
call waits about one service time more on average), and ranks of a node do not call in
lock-step. A node of C cores that gives L of them to Linux runs C - L ranks, so it needs
the smallest L with (C - L) * rate <= L * calls_per_core.

The cost is a small call's (a 64-byte pwrite64); opens and stats cost the proxy more, so
a rate of mixed calls should be given in small-call equivalents, or with margin.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

UTILIZATION = 0.7
BENCH_FILE = "bench-offload.json"


class CapacityError(ValueError):
    """No usable measurement, or a request that cannot be projected."""


@dataclass(frozen=True)
class Projection:
    source: str               # the bench file the cost came from
    origin: str               # "last measured" or "reference"
    cpu_per_call_us: float    # the proxy's on-CPU time per small call, under load
    rate: float               # offloaded calls per second of one rank
    utilization: float
    calls_per_core: float     # calls per second one Linux core serves at that utilization
    ranks_per_core: int       # ranks of `rate` one Linux core serves
    cores: int                # CPUs of the node
    linux_cores: int          # --linux-cores that node needs (0: it cannot be served)
    ranks: int                # ranks left on the node's LWK cores


def reference_dir() -> Path:
    """results/reference of the source tree this package runs from."""
    return Path(__file__).resolve().parents[2] / "results" / "reference"


def _cost(path: Path) -> float | None:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        value = float(data["capacity"]["proxy_cpu_per_call_us"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return value if value > 0 else None


def measured_cost(results: Path, reference: Path | None = None) -> tuple[float, Path, str]:
    """(cost per call in us, file, origin): the last measured numbers in `results`, else
    the reference numbers."""
    for directory, origin in ((results, "last measured"), (reference or reference_dir(), "reference")):
        path = directory / BENCH_FILE
        cost = _cost(path)
        if cost is not None:
            return cost, path, origin
    raise CapacityError(f"no capacity measurement in {results / BENCH_FILE} nor in the "
                        "reference numbers: run `mckmpi bench offload` first")


def project(rate: float, cores: int, cost_us: float, *, source: str = "", origin: str = "",
            utilization: float = UTILIZATION) -> Projection:
    """The projection for ranks of `rate` offloaded calls/s each on a node of `cores` CPUs."""
    if not rate > 0:
        raise CapacityError(f"the call rate must be positive, not {rate:g}")
    if cores < 2:
        raise CapacityError(f"a node needs at least 2 cores (one for Linux), not {cores}")
    if not 0 < utilization <= 1:
        raise CapacityError(f"the utilization must be in (0, 1], not {utilization:g}")
    per_core = utilization * 1e6 / cost_us
    # smallest L with (cores - L) * rate <= L * per_core
    need = math.ceil(cores * rate / (rate + per_core))
    linux = max(1, need) if need < cores else 0
    return Projection(source=source, origin=origin, cpu_per_call_us=cost_us, rate=rate,
                      utilization=utilization, calls_per_core=per_core,
                      ranks_per_core=int(per_core // rate), cores=cores, linux_cores=linux,
                      ranks=cores - linux if linux else 0)


def describe(p: Projection) -> list[str]:
    """The projection as lines a person reads."""
    lines = [
        (f"proxy cost per small call: {p.cpu_per_call_us:.2f} us of one core "
         f"({p.origin} numbers: {p.source})"),
        (f"one Linux core serves {p.calls_per_core:,.0f} calls/s at {p.utilization:.0%} busy: "
         f"{p.ranks_per_core} ranks of {p.rate:g} calls/s"),
    ]
    if p.linux_cores:
        lines.append(f"a node of {p.cores} cores needs --linux-cores {p.linux_cores} "
                     f"({p.ranks} ranks of {p.rate:g} calls/s)")
    else:
        lines.append(f"a node of {p.cores} cores cannot serve even one rank of {p.rate:g} "
                     "calls/s on the others: lower the rate or offload less")
    return lines
