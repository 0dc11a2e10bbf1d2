"""`mckmpi compare A B`: two runs side by side (typically linux vs lwk), with ratios.

Metrics of noise, latency and time are better when lower, so the text can say which run
wins and by how much; counters without a direction (allocations, bytes) are shown with
their ratio and no verdict.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mckmpi.analysis import kernel
from mckmpi.analysis.report import num
from mckmpi.analysis.stats import order_index
from mckmpi.analysis.summary import RunSummary
from mckmpi.utility.table import counted, render

#: Counters whose growth means noise (faults, preemptions, fallbacks out of the arena).
_NOISY_COUNTERS = ("flt", "involuntary", "fallback")


@dataclass(frozen=True)
class Metric:
    section: str
    name: str
    unit: str
    a: float
    b: float
    directed: bool  # lower is better; False: no direction (a plain count)

    @property
    def ratio(self) -> float:
        """B / A (inf when only A is 0, NaN when both are)."""
        if self.a == 0:
            return math.nan if self.b == 0 else math.inf
        return self.b / self.a

    def winner(self) -> int | None:
        """0 for A, 1 for B, None for a tie or no direction."""
        if not self.directed or self.a == self.b:
            return None
        return int(self.b < self.a)

    def factor(self) -> float:
        """How many times better the winner is (inf when the winner is at 0)."""
        lo, hi = sorted((abs(self.a), abs(self.b)))
        return math.inf if lo == 0 else hi / lo

    def to_json(self) -> dict[str, Any]:
        w = self.winner()
        return {
            "section": self.section,
            "name": self.name,
            "unit": self.unit,
            "a": self.a,
            "b": self.b,
            "ratio_b_over_a": self.ratio,
            "better": "lower" if self.directed else None,
            "winner": None if w is None else "ab"[w],
            "factor": self.factor() if w is not None else None,
        }


def labels(a: RunSummary, b: RunSummary) -> tuple[str, str]:
    """Names for the two sides: their modes when they differ, else file stems, else A/B."""
    for la, lb in ((a.label, b.label), (a.path.stem, b.path.stem)):
        if la and lb and la != lb:
            return la, lb
    return "A", "B"


def _agg(values: Sequence[float], how: Callable[[Any], Any]) -> float:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(how(vals)) if vals else math.nan


def _side(s: RunSummary) -> dict[tuple[str, str, str, bool], float]:
    """The comparable numbers of one run, keyed by (section, name, unit, lower is better)."""
    m: dict[tuple[str, str, str, bool], float] = {}
    fwq = [r for r in s.fwq if r.samples]
    if fwq:
        m[("FWQ", "min sample, median rank", "us", False)] = _agg(
            [r.quantum_ns / 1e3 for r in fwq], np.median
        )
        for q, attr in (("p50", "p50_ns"), ("p99", "p99_ns"), ("p99.9", "p999_ns")):
            m[("FWQ", f"excess {q}, median rank", "us", True)] = _agg(
                [getattr(r, attr) / 1e3 for r in fwq], np.median
            )
        m[("FWQ", "excess p99.9, worst rank", "us", True)] = _agg(
            [r.p999_ns / 1e3 for r in fwq], np.max
        )
        m[("FWQ", "excess max, worst rank", "us", True)] = _agg(
            [r.max_ns / 1e3 for r in fwq], np.max
        )
        m[("FWQ", "noise fraction, mean of ranks", "%", True)] = _agg(
            [r.noise_fraction * 100 for r in fwq], np.mean
        )
    ftq = [r for r in s.ftq if r.intervals]
    if ftq:
        m[("FTQ", "noise fraction, mean of ranks", "%", True)] = _agg(
            [r.noise_fraction * 100 for r in ftq], np.mean
        )
    if s.detours:
        d = s.detours
        m[("detours", "detours per second, mean of ranks", "1/s", True)] = _agg(
            [r.rate_hz for r in d], np.mean
        )
        m[("detours", "noise fraction, mean of ranks", "%", True)] = _agg(
            [r.fraction * 100 for r in d], np.mean
        )
        m[("detours", "duration p99, median rank", "us", True)] = _agg(
            [r.p99_ns / 1e3 for r in d], np.median
        )
        m[("detours", "duration max, worst rank", "us", True)] = _agg(
            [r.max_ns / 1e3 for r in d], np.max
        )
    if s.calls:
        lat = np.sort(np.concatenate([c.latencies_ns for c in s.calls]))
        m[("offload", "calls", "", False)] = float(sum(c.count for c in s.calls))
        m[("offload", "bytes", "B", False)] = float(sum(c.bytes for c in s.calls))
        m[("offload", "latency p50, all calls", "us", True)] = (
            float(lat[order_index(0.5, lat.size)]) / 1e3
        )
        m[("offload", "latency p99, all calls", "us", True)] = (
            float(lat[order_index(0.99, lat.size)]) / 1e3
        )
    for c in s.counters:
        if c.median is not None:
            noisy = any(k in c.key for k in _NOISY_COUNTERS)
            m[("counters", f"{c.key}, median rank", c.units, noisy)] = float(c.median)
    if s.app is not None:
        if s.app.wall_ns is not None:
            m[("app", "wall time, slowest rank", "s", True)] = s.app.wall_ns / 1e9
        if s.app.iterations:
            m[("app", "iteration p50 (slowest rank)", "us", True)] = s.app.iter_p50_ns / 1e3
            m[("app", "iteration p99 (slowest rank)", "us", True)] = s.app.iter_p99_ns / 1e3
            m[("app", "iteration max (slowest rank)", "us", True)] = s.app.iter_max_ns / 1e3
        for t in s.app.allreduce:
            m[("app", f"allreduce {t.key} p50", "us", True)] = t.p50_ns / 1e3
            m[("app", f"allreduce {t.key} p99", "us", True)] = t.p99_ns / 1e3
    for name, (unit, value) in kernel.per_rank_core(s.kernel).items():
        m[("kernel", f"{name} per rank core", unit, True)] = value
    others = kernel.per_rank_core(s.kernel_app).get("other tasks' CPU time")
    if s.kernel_window == "measured" and others is not None:
        m[("kernel", "other tasks' CPU time per rank core (whole app)", others[0], True)] = others[1]
    return m


def metrics(a: RunSummary, b: RunSummary) -> list[Metric]:
    """Every metric both runs have, in a stable order."""
    ma, mb = _side(a), _side(b)
    return [
        Metric(*key[:3], ma[key], mb[key], key[3])
        for key in ma
        if key in mb and math.isfinite(ma[key]) and math.isfinite(mb[key])
    ]


#: The metrics the verdict lines speak about, when both runs have them.
HEADLINES = (
    ("FWQ", "excess p99.9, worst rank"),
    ("FWQ", "noise fraction, mean of ranks"),
    ("detours", "noise fraction, mean of ranks"),
    ("FTQ", "noise fraction, mean of ranks"),
    ("kernel", "IPIs (RES+CAL+TLB) per rank core"),
    ("offload", "latency p50, all calls"),
    ("app", "iteration p50 (slowest rank)"),
    ("app", "wall time, slowest rank"),
)


def _how_much(m: Metric) -> str:
    f = m.factor()
    return "down to zero" if math.isinf(f) else f"{f:.3g}x lower"


def verdict(m: Metric, names: tuple[str, str]) -> str:
    w = m.winner()
    if not m.directed:
        return ""
    return "same" if w is None else f"{names[w]} {_how_much(m)}"


def _value(v: float, unit: str) -> str:
    return f"{v:.4g} {unit}".rstrip() if abs(v) < 1e4 else f"{v:.0f} {unit}".rstrip()


def text(a: RunSummary, b: RunSummary) -> str:
    """The comparison as text: who is who, the verdicts, then every metric."""
    names = labels(a, b)
    rows = metrics(a, b)
    lines = []
    for tag, s, name in (("A", a, names[0]), ("B", b, names[1])):
        app = s.app.name if s.app is not None and s.app.name else s.attrs.get("app", "")
        lines.append(
            f"{tag} = {name:<8} {s.path}  ({s.attrs.get('mode')} mode, "
            f"{_count(s.attrs.get('world_size'), 'rank')}, "
            f"{_count(s.attrs.get('nnodes'), 'node')}, app {app})"
        )
    if not rows:
        lines.append("\nnothing to compare: the two runs recorded no common data")
        return "\n".join(lines)
    by_key = {(m.section, m.name): m for m in rows}
    heads = [by_key[k] for k in HEADLINES if k in by_key]
    if heads:
        lines.append("")
        for m in heads:
            w = m.winner()
            detail = f"({names[0]} {_value(m.a, m.unit)}, {names[1]} {_value(m.b, m.unit)})"
            if w is None:
                lines.append(f"{m.section} {m.name}: the same in both {detail}")
            else:
                lines.append(
                    f"{m.section} {m.name}: {names[w]} is better, {_how_much(m)} {detail}"
                )
    directed = [m for m in rows if m.directed]
    if directed:
        wins = [sum(1 for m in directed if m.winner() == i) for i in (0, 1)]
        lines.append(
            f"of the {len(directed)} metrics with a direction: {names[1]} better in {wins[1]}, "
            f"{names[0]} better in {wins[0]}, equal in {len(directed) - sum(wins)}"
        )
    table = [
        [
            m.section,
            m.name,
            m.unit,
            num(m.a),
            num(m.b),
            "-" if not math.isfinite(m.ratio) else num(m.ratio),
            verdict(m, names),
        ]
        for m in rows
    ]
    lines.append("")
    lines.append(
        render(
            ("section", "metric", "unit", names[0], names[1], f"{names[1]}/{names[0]}", "better"),
            table,
            title=f"side by side (ratio = {names[1]} / {names[0]})",
        )
    )
    return "\n".join(lines)


def to_json(a: RunSummary, b: RunSummary) -> dict[str, Any]:
    names = labels(a, b)
    return {
        "a": {"label": names[0], "path": str(a.path)},
        "b": {"label": names[1], "path": str(b.path)},
        "metrics": [m.to_json() for m in metrics(a, b)],
    }


def _count(value: object, noun: str) -> str:
    """A count read from a run file's attributes ('2 ranks'; '? ranks' when missing)."""
    try:
        return counted(int(value), noun)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return f"? {noun}s"
