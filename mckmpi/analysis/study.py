"""`mckmpi study collect` and `plot`: one table of many runs, and its scaling curves.

`collect` walks a directory for run files, summarises each (files that are incomplete or
not run files are listed and skipped, never fatal) and writes a study file: HDF5 with
root attributes `schema` = "mckmpi.study", `schema_version` = 1, `created`, `source`, and
one dataset `runs`, a table with one row per run (`STUDY_DTYPE`; units are in the column
names; unknown numbers are NaN, unknown integers -1). Speedup and efficiency follow
`mckmpi.analysis.scaling`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from mckmpi.analysis import scaling
from mckmpi.analysis.report import num
from mckmpi.analysis.summary import RunSummary, summarize
from mckmpi.errors import UsageError
from mckmpi.trace.reader import RunFileError, open_run
from mckmpi.trace.schema import PARTIAL_SUFFIX
from mckmpi.utility.table import render

STUDY_SCHEMA = "mckmpi.study"
STUDY_VERSION = 1

STUDY_DTYPE = np.dtype(
    [
        ("path", "S512"),
        ("app", "S64"),
        ("mode", "S16"),
        ("scaling", "S16"),
        ("nodes", "i4"),
        ("ranks", "i4"),
        ("size", "S32"),  # the app's global_size as recorded (a count or a shape)
        ("global_size", "i8"),  # its element count
        ("iterations", "i8"),
        ("wall_s", "f8"),  # slowest rank's wall time
        ("iter_us", "f8"),  # median over iterations of the slowest rank's time
        ("verified", "i1"),  # 1 / 0, -1 unknown
        ("fwq_p999_us", "f8"),  # worst rank's p99.9 FWQ excess
        ("noise_pct", "f8"),  # FWQ noise fraction (mean of ranks), else detours'
        ("speedup", "f8"),
        ("efficiency", "f8"),
        ("baseline_ranks", "i4"),
        ("slurm_job_id", "S32"),
        ("created", "S32"),
    ]
)


class StudyFileError(UsageError):
    """A file that is not a readable study file."""


@dataclass
class Collected:
    rows: np.ndarray
    skipped: list[tuple[Path, str]]


def _row(s: RunSummary, root: Path) -> np.void:
    row = np.zeros((), dtype=STUDY_DTYPE)
    a, app = s.attrs, s.app
    try:
        rel = str(s.path.relative_to(root))
    except ValueError:
        rel = str(s.path)
    row["path"] = rel.encode()[:512]
    row["app"] = (
        app.name if app is not None and app.name else Path(str(a.get("app", ""))).stem
    ).encode()[:64]
    row["mode"] = str(a.get("mode", "")).encode()[:16]
    row["scaling"] = (app.scaling if app is not None else "").encode()[:16]
    row["nodes"] = int(a.get("nnodes") or 0)
    row["ranks"] = int(a.get("world_size") or 0)
    row["size"] = (app.size if app is not None else "").encode()[:32]
    row["global_size"] = app.global_size if app is not None and app.global_size is not None else -1
    row["iterations"] = app.iterations if app is not None and app.iterations else -1
    row["wall_s"] = app.wall_ns / 1e9 if app is not None and app.wall_ns is not None else math.nan
    row["iter_us"] = app.iter_p50_ns / 1e3 if app is not None and app.iterations else math.nan
    row["verified"] = -1 if app is None or app.verified is None else int(app.verified)
    fwq = [r for r in s.fwq if r.samples]
    row["fwq_p999_us"] = max(r.p999_ns for r in fwq) / 1e3 if fwq else math.nan
    if fwq:
        row["noise_pct"] = float(np.mean([r.noise_fraction for r in fwq])) * 100
    elif s.detours:
        row["noise_pct"] = float(np.nanmean([r.fraction for r in s.detours])) * 100
    else:
        row["noise_pct"] = math.nan
    row["slurm_job_id"] = str(a.get("slurm_job_id", "")).encode()[:32]
    row["created"] = str(a.get("created", "")).encode()[:32]
    return row


def collect(directory: str | Path) -> Collected:
    """Summarise every complete run file under `directory` (recursively), sorted by path."""
    root = Path(directory)
    if not root.is_dir():
        raise UsageError(f"not a directory: {root}")
    rows, skipped = [], []
    for path in sorted(root.rglob("*.h5")) + sorted(root.rglob(f"*.h5{PARTIAL_SUFFIX}")):
        try:
            with open_run(path) as run:
                rows.append(_row(summarize(run), root))
        except RunFileError as exc:
            skipped.append((path, str(exc).removeprefix(f"{path}: ")))
    if not rows:
        why = (
            f" ({len(skipped)} files skipped, e.g. {skipped[0][0]}: {skipped[0][1]})"
            if skipped
            else ""
        )
        raise UsageError(f"no complete run files under {root}{why}")
    table = np.array(rows, dtype=STUDY_DTYPE)
    scaling.apply(table)
    return Collected(table, skipped)


def write(rows: np.ndarray, path: str | Path, source: str) -> Path:
    """Write the study file (replacing it atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + PARTIAL_SUFFIX)
    with h5py.File(tmp, "w") as f:
        f.attrs["schema"] = STUDY_SCHEMA
        f.attrs["schema_version"] = STUDY_VERSION
        f.attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        f.attrs["source"] = source
        f.create_dataset("runs", data=rows)
    tmp.replace(path)
    return path


def read(path: str | Path) -> np.ndarray:
    """The runs table of a study file; a clear `StudyFileError` for anything else."""
    path = Path(path)
    if not path.is_file():
        raise StudyFileError(f"no such study file: {path}")
    try:
        with h5py.File(path, "r") as f:
            schema = f.attrs.get("schema")
            version = f.attrs.get("schema_version")
            schema = schema.decode() if isinstance(schema, bytes) else schema
            if schema != STUDY_SCHEMA:
                hint = " (a run file: give it to `mckmpi report`)" if schema == "mckmpi.run" else ""
                raise StudyFileError(f"{path}: not an mckmpi study file (schema {schema!r}){hint}")
            if version is None or int(version) > STUDY_VERSION:
                raise StudyFileError(
                    f"{path}: study schema version {version} is newer than this "
                    f"mckmpi reads ({STUDY_VERSION}): upgrade mckmpi"
                )
            rows = f["runs"][()]
    except (OSError, KeyError) as exc:
        raise StudyFileError(f"{path}: not a readable study file ({exc})") from None
    missing = set(STUDY_DTYPE.names or ()) - set(rows.dtype.names or ())
    if missing:
        raise StudyFileError(f"{path}: study table lacks columns {sorted(missing)}")
    return rows


def text(rows: np.ndarray) -> str:
    """The study table as text, one row per run, sorted by app, mode and ranks."""

    def s(v: bytes) -> str:
        return v.decode(errors="replace")

    order = np.lexsort((rows["ranks"], rows["mode"], rows["scaling"], rows["app"]))
    table = [
        [
            s(r["app"]),
            s(r["mode"]),
            s(r["scaling"]) or "-",
            int(r["nodes"]),
            int(r["ranks"]),
            s(r["size"]) or "-",
            num(float(r["wall_s"])),
            num(float(r["iter_us"])),
            num(float(r["speedup"])),
            num(float(r["efficiency"])),
            num(float(r["fwq_p999_us"])),
            num(float(r["noise_pct"])),
            {1: "yes", 0: "NO", -1: "-"}[int(r["verified"])],
            s(r["path"]),
        ]
        for r in rows[order]
    ]
    return render(
        (
            "app",
            "mode",
            "scaling",
            "nodes",
            "ranks",
            "size",
            "wall s",
            "iter us",
            "speedup",
            "efficiency",
            "fwq p99.9 us",
            "noise %",
            "verified",
            "file",
        ),
        table,
        title=f"study: {len(rows)} runs (speedup and efficiency against the fewest ranks "
        f"of each series)",
    )
