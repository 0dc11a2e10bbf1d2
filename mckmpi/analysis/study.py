"""`mckmpi study collect` and `plot`: one table of many runs, and its scaling curves.

`collect` walks a directory for run files, summarises each (files that are not run files
or cannot be read are listed and skipped, never fatal; partial files of jobs that did not
finish are read as far as they go, marked `complete` = 0, and never count as repeats of a
point) and writes a study file: HDF5 with
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
from typing import Any

import h5py
import numpy as np

from mckmpi.analysis import scaling
from mckmpi.analysis.report import num
from mckmpi.analysis.summary import RunSummary, summarize
from mckmpi.errors import UsageError
from mckmpi.trace.reader import RunFileError, is_complete, open_run
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
        ("complete", "i1"),  # 0: a partial file (the job did not finish)
        ("ending", "S16"),  # how the job ended (run file attribute `ending`)
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
    row["complete"] = int(is_complete(s.path, a))
    row["ending"] = str(a.get("ending", "")).encode()[:16]
    return row


def collect(directory: str | Path) -> Collected:
    """Summarise every complete run file under `directory` (recursively), sorted by path."""
    root = Path(directory)
    if not root.is_dir():
        raise UsageError(f"not a directory: {root}")
    rows, skipped = [], []
    for path in run_files(root):
        try:
            with open_run(path, allow_incomplete=path.name.endswith(PARTIAL_SUFFIX)) as run:
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


def run_files(root: Path) -> list[Path]:
    """Run files under `root`: complete ones, then partial ones whose job left no complete
    file (a job stopped between renaming and cleaning up leaves both). Files inside a
    partial file's spool directory are the writer's, not runs."""
    def outside_spools(p: Path) -> bool:
        return not any(parent.name.endswith(f".h5{PARTIAL_SUFFIX}.d") for parent in p.parents)

    done = sorted(p for p in root.rglob("*.h5") if outside_spools(p))
    partial = sorted(p for p in root.rglob(f"*.h5{PARTIAL_SUFFIX}") if outside_spools(p)
                     and not p.with_name(p.name.removesuffix(PARTIAL_SUFFIX)).exists())
    return done + partial


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
            s(r["ending"]) if "ending" in rows.dtype.names else "-",
            s(r["path"]) + ("" if scaling.is_complete(r) else " (partial)"),
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
            "ending",
            "file",
        ),
        table,
        title=f"study: {len(rows)} runs (speedup and efficiency against the fewest ranks "
        f"of each series; partial runs of jobs that did not finish are not counted)",
    )


#: Units of the study table's columns (their names carry them too).
STUDY_UNITS = {"wall_s": "s", "iter_us": "us", "fwq_p999_us": "us", "noise_pct": "%",
               "global_size": "1", "iterations": "1", "speedup": "1", "efficiency": "1"}


@dataclass
class Study:
    """A study for notebooks: one row per run ("points"), from a directory of run files
    (summarised now, as `collect` does) or from a study file."""

    source: Path
    root: Path  # what the rows' `path` column is relative to
    rows: np.ndarray
    skipped: list[tuple[Path, str]]

    def to_pandas(self, name: str = "points") -> Any:
        """The points table as a `pandas.DataFrame` (text decoded; units in ``attrs``)."""
        from mckmpi.trace.frames import columns, need

        if name not in ("points", "runs"):
            raise UsageError(f"a study has one table, 'points' (not {name!r})")
        frame = need("pandas").DataFrame(columns(self.rows))
        frame.attrs["units"] = dict(STUDY_UNITS)
        frame.attrs["source"] = str(self.source)
        return frame

    def to_xarray(self) -> Any:
        """The points as an `xarray.Dataset` along dimension ``point``."""
        from mckmpi.trace.frames import columns, need

        xr = need("xarray")
        data = {k: xr.Variable(("point",), v, {"units": STUDY_UNITS[k]} if k in STUDY_UNITS else {})
                for k, v in columns(self.rows).items()}
        return xr.Dataset(data, coords={"point": np.arange(len(self.rows))},
                          attrs={"source": str(self.source)})

    def run_paths(self) -> list[Path]:
        """The run file of every point, in row order."""
        return [self.root / p.decode(errors="replace") for p in self.rows["path"].tolist()]


def open_study(path: str | Path) -> Study:
    """A directory of run files (complete ones become points; others are listed in
    `skipped`) or a study file written by `mckmpi study collect`."""
    path = Path(path)
    if path.is_dir():
        found = collect(path)
        return Study(path, path, found.rows, found.skipped)
    rows = read(path)
    with h5py.File(path, "r") as f:
        source = f.attrs.get("source", "")
    source = source.decode() if isinstance(source, bytes) else str(source)
    return Study(path, Path(source) if source else path.parent, rows, [])
