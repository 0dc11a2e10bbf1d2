"""`mckmpi check`: pass or fail measured runs against a reference file, for nightly gates.

A reference file (TOML) holds, per system and app, the expected value of each metric and
how far a run may stray from it (ReFrame's reference idea: a value with relative lower and
upper thresholds):

    system = "mckmpi"            # Slurm cluster name or host name the numbers belong to
    app = "stencil"

    [all]                        # every point, unless the point has its own entry
    verified = { value = 1, lower = 0, upper = 0 }

    [points."stencil-strong-linux-n2"]
    iter_us = { value = 850.0, lower = -0.5, upper = 0.10, unit = "us" }
    wall_s = { value = 0.1, tolerance = 0.2 }          # tolerance = T is lower -T, upper T

The allowed band is value * (1 + lower) .. value * (1 + upper); a missing bound is open.
A point's measured value is the median of its repeats, and noise is their 95% interval
(`mckmpi.analysis.repeats`). A metric whose median leaves the band fails only when its
whole interval lies outside the band too (a regression beyond the tolerance and beyond
the noise); a median outside a band the interval still reaches is reported as `noise`
and passes. A point or metric the reference names but the runs lack fails (`missing`):
a gate must not pass because a job did not run.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mckmpi.analysis.repeats import CI_METHOD, Interval, interval
from mckmpi.analysis.report import fmt, num
from mckmpi.errors import UsageError
from mckmpi.utility.table import render

PASS, NOISE, FAIL, MISSING = "pass", "noise", "FAIL", "MISSING"
#: Metrics a reference may name: study-table columns (`mckmpi.analysis.study.STUDY_DTYPE`).
METRICS = ("iter_us", "wall_s", "fwq_p999_us", "noise_pct", "speedup", "efficiency",
           "verified", "predicted_iter_us", "prediction_error")


class ReferenceError(UsageError):
    """A reference file that cannot be used."""


@dataclass(frozen=True)
class Bound:
    """One metric's reference: value and relative thresholds (None: open side)."""

    value: float
    lower: float | None
    upper: float | None
    unit: str = ""

    @property
    def low(self) -> float:
        return -math.inf if self.lower is None else self.value * (1 + self.lower)

    @property
    def high(self) -> float:
        return math.inf if self.upper is None else self.value * (1 + self.upper)

    def describe(self) -> str:
        lo = "" if self.lower is None else f"{self.lower:+.0%}"
        hi = "" if self.upper is None else f"{self.upper:+.0%}"
        return f"{self.value:g} {self.unit} [{lo or '-inf'}, {hi or '+inf'}]".replace("  ", " ")


@dataclass(frozen=True)
class Reference:
    path: Path
    system: str
    app: str
    every: dict[str, Bound]
    points: dict[str, dict[str, Bound]]

    def bounds(self, point: str) -> dict[str, Bound]:
        return {**self.every, **self.points.get(point, {})}


@dataclass(frozen=True)
class Verdict:
    point: str
    metric: str
    bound: Bound
    measured: Interval
    status: str


def _bound(where: str, spec: Any) -> Bound:
    if not isinstance(spec, Mapping) or "value" not in spec:
        raise ReferenceError(f"{where}: want a table with a value, e.g. "
                             "{ value = 850.0, lower = -0.5, upper = 0.1 }")
    unknown = set(spec) - {"value", "lower", "upper", "tolerance", "unit"}
    if unknown:
        raise ReferenceError(f"{where}: unknown keys {sorted(unknown)} (value, lower, upper, "
                             "tolerance, unit)")
    try:
        value = float(spec["value"])
        lower = spec.get("lower", -spec["tolerance"] if "tolerance" in spec else None)
        upper = spec.get("upper", spec.get("tolerance"))
        lower = None if lower is None else float(lower)
        upper = None if upper is None else float(upper)
    except (TypeError, ValueError):
        raise ReferenceError(f"{where}: value and thresholds must be numbers") from None
    if (lower is not None and lower > 0) or (upper is not None and upper < 0):
        raise ReferenceError(f"{where}: lower must be <= 0 and upper >= 0 (fractions of the "
                             f"value, e.g. lower = -0.1, upper = 0.1)")
    return Bound(value, lower, upper, str(spec.get("unit", "")))


def _metrics(where: str, table: Any) -> dict[str, Bound]:
    if not isinstance(table, Mapping):
        raise ReferenceError(f"{where}: want a table of metrics")
    unknown = [m for m in table if m not in METRICS]
    if unknown:
        raise ReferenceError(f"{where}: unknown metric {unknown[0]!r} (known: "
                             f"{', '.join(METRICS)})")
    return {m: _bound(f"{where}.{m}", spec) for m, spec in table.items()}


def load_reference(path: str | Path) -> Reference:
    """Parse and check a reference file; every mistake is one clear line."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ReferenceError(f"cannot read reference file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ReferenceError(f"{path}: not UTF-8 text, so not a TOML reference file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ReferenceError(f"{path}: not valid TOML ({exc})") from None
    unknown = set(data) - {"system", "app", "all", "points"}
    if unknown:
        raise ReferenceError(f"{path}: unknown keys {sorted(unknown)} (system, app, all, points)")
    points = data.get("points", {})
    if not isinstance(points, Mapping):
        raise ReferenceError(f"{path}: [points] must be a table of point names")
    ref = Reference(path, str(data.get("system", "")), str(data.get("app", "")),
                    _metrics(f"{path}: [all]", data.get("all", {})),
                    {name: _metrics(f"{path}: [points.{name}]", t) for name, t in points.items()})
    if not ref.every and not ref.points:
        raise ReferenceError(f"{path}: no reference values ([all] or [points.NAME])")
    return ref


def judge(bound: Bound, measured: Interval) -> str:
    """pass, noise (median outside, interval reaching the band), FAIL, or MISSING."""
    if measured.n == 0 or not math.isfinite(measured.median):
        return MISSING
    if bound.low <= measured.median <= bound.high:
        return PASS
    if math.isfinite(measured.low) and measured.low <= bound.high and measured.high >= bound.low:
        return NOISE
    return FAIL


def _s(v: Any) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


def check(rows: np.ndarray, ref: Reference) -> list[Verdict]:
    """The verdict of every (point, metric) the reference names, for the runs in `rows`
    (a study table); points of the runs the reference does not name are checked against
    [all] only."""
    apps = sorted({_s(a) for a in rows["app"]})
    if ref.app and ref.app not in apps:
        raise ReferenceError(f"{ref.path} is a reference for app {ref.app}; the runs are of "
                             f"{', '.join(apps)}")
    systems = {_s(h) for h in rows["host"]} | {_s(c) for c in rows["cluster"]}
    if ref.system and ref.system not in systems:
        raise ReferenceError(f"{ref.path} is a reference for system {ref.system}; the runs "
                             f"come from {', '.join(sorted(s for s in systems if s)) or 'an unknown system'}")
    by_point: dict[str, np.ndarray] = {}
    for name in sorted({_s(p) for p in rows["point"]}):
        by_point[name] = rows[rows["point"] == name.encode()]
    verdicts = []
    for name in sorted(set(by_point) | set(ref.points)):
        mine = by_point.get(name)
        for metric, bound in sorted(ref.bounds(name).items()):
            values = np.zeros(0) if mine is None else mine[metric].astype(np.float64)
            if metric == "verified":
                values = np.where(values < 0, np.nan, values)  # -1: the app did not say
            verdicts.append(Verdict(name, metric, bound, interval(values),
                                    judge(bound, interval(values))))
    return verdicts


def failed(verdicts: list[Verdict]) -> list[Verdict]:
    return [v for v in verdicts if v.status in (FAIL, MISSING)]


def text(verdicts: list[Verdict], ref: Reference) -> str:
    rows = [[v.point, v.metric, v.bound.describe(), num(v.measured.median),
             "-" if not math.isfinite(v.measured.low)
             else f"{fmt(v.measured.low)} .. {fmt(v.measured.high)}",
             v.measured.n, v.status] for v in verdicts]
    bad = failed(verdicts)
    title = (f"check against {ref.path}" + (f" (system {ref.system}" if ref.system else " (")
             + (f", app {ref.app})" if ref.app else ")"))
    summary = (f"{len(verdicts) - len(bad)} of {len(verdicts)} pass"
               + (f"; {len(bad)} fail: " + ", ".join(f"{v.point} {v.metric}" for v in bad)
                  if bad else ""))
    return "\n".join([
        render(("point", "metric", "reference [band]", "median", "95% CI", "runs", "verdict"),
               rows, title=title),
        f"median of the repeats; CI: {CI_METHOD}; FAIL = the whole interval (or, with one run, "
        "the value) outside the band; noise = median outside, interval inside",
        summary,
    ])
