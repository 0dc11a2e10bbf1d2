"""Everything `report`, `compare` and `study` say about one run file, computed once.

`summarize` reads each concern that is present (a file may lack any group) and keeps both
the numbers (`to_json`) and the reduced series the plots need, so a 10^8-sample file is
streamed once per report, not once per table and again per plot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mckmpi.analysis import app as app_module
from mckmpi.analysis import counters as counters_module
from mckmpi.analysis import kernel as kernel_module
from mckmpi.analysis import noise, offload
from mckmpi.trace.reader import BLOCK_ELEMENTS, Run


@dataclass
class RunSummary:
    path: Path
    attrs: dict[str, Any]
    provenance: dict[str, Any]
    ranks: np.ndarray | None
    noise_attrs: dict[str, Any]
    fwq: list[noise.FwqRank]
    ftq: list[noise.FtqRank]
    detours: list[noise.DetourRank]
    calls: list[offload.CallStats]
    counters: list[counters_module.CounterStats]
    app: app_module.AppStats | None
    datasets: list[tuple[str, str, str, str, str]]  # name, kind, shape, dtype, units
    kernel: list[kernel_module.Core] = field(default_factory=list)  # the steady window
    kernel_window: str = ""  # "measured" (the app's measured phases) or "app"
    kernel_app: list[kernel_module.Core] = field(default_factory=list)  # the whole app
    kernel_attrs: dict[str, Any] = field(default_factory=dict)
    detour_histogram: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))

    @property
    def label(self) -> str:
        """Short name for tables and plot legends: the mode, else the file's stem."""
        return str(self.attrs.get("mode") or self.path.stem)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "attrs": self.attrs,
            "provenance": self.provenance,
            "ranks": [] if self.ranks is None else [_row(r) for r in self.ranks],
            "noise": {
                "attrs": self.noise_attrs,
                "fwq": [r.to_json() for r in self.fwq],
                "ftq": [r.to_json() for r in self.ftq],
                "detours": [r.to_json() for r in self.detours],
            },
            "offload": [c.to_json() for c in self.calls],
            "counters": [c.to_json() for c in self.counters],
            "app": None if self.app is None else self.app.to_json(),
            "kernel": {"attrs": self.kernel_attrs, "window": self.kernel_window,
                       "cores": [c.to_json() for c in self.kernel],
                       "app_cores": [c.to_json() for c in self.kernel_app]},
            "datasets": [
                dict(zip(("name", "kind", "shape", "dtype", "units"), d)) for d in self.datasets
            ],
        }


def plain(obj: Any) -> Any:
    """`obj` with numpy values, paths and bytes turned into JSON types; NaN becomes None."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return plain(obj.tolist())
    if isinstance(obj, np.generic):
        return plain(obj.item())
    if isinstance(obj, bytes):
        return obj.decode(errors="replace")
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (str, int, float)):
        return obj
    return str(obj)  # what else a file may hold (complex numbers, references): as text


def _row(row: np.void) -> dict[str, Any]:
    out = {}
    for name in row.dtype.names or ():
        v = row[name]
        out[name] = v.decode(errors="replace") if isinstance(v, bytes) else v.item()
    return out


def _describe(run: Run, name: str) -> tuple[str, str, str, str, str]:
    ds = run[name]
    return (
        name,
        run.kind(name),
        "x".join(map(str, ds.shape)),
        str(ds.dtype) if ds.dtype.names is None else "table",
        run.units(name),
    )


def summarize(run: Run, block: int = BLOCK_ELEMENTS) -> RunSummary:
    """All statistics of `run` (see each module for the definitions)."""
    return RunSummary(
        path=run.path,
        attrs=run.attrs,
        provenance=run.provenance,
        ranks=run.ranks if "ranks" in run else None,
        noise_attrs=run.group_attrs("noise"),
        fwq=noise.fwq(run, block),
        ftq=noise.ftq(run, block),
        detours=noise.detours(run),
        calls=offload.calls(run),
        counters=counters_module.counters(run),
        app=app_module.app(run, block),
        datasets=[_describe(run, name) for name in run.datasets()],
        detour_histogram=noise.detour_histogram(run),
        kernel=kernel_module.cores(run, kernel_module.steady_window(run)),
        kernel_window=kernel_module.steady_window(run),
        kernel_app=kernel_module.cores(run, "app"),
        kernel_attrs=kernel_module.attrs(run),
    )
