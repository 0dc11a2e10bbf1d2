"""`mckmpi study collect` and `plot`: one table of many runs, and its scaling curves.

`collect` walks a directory for run files, summarises each (files that are not run files
or cannot be read are listed and skipped, never fatal; partial files of jobs that did not
finish are read as far as they go, marked `complete` = 0, and never count as repeats of a
point) and writes a study file: HDF5 with
root attributes `schema` = "mckmpi.study", `schema_version`, `created`, `source`, and
two tables, `runs` with one row per run (`STUDY_DTYPE`; units are in the column names;
unknown numbers are NaN, unknown integers -1) and `points` (`POINTS_DTYPE`), each laid out
as run files lay out theirs (one dataset per column along dimension ``run`` or
``point_metric``: netCDF tools read them). Speedup and efficiency follow
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
from mckmpi.analysis.report import fmt, num
from mckmpi.analysis.summary import RunSummary, summarize
from mckmpi.errors import UsageError
from mckmpi.trace.labels import label
from mckmpi.trace.layout import write_table
from mckmpi.trace.reader import RunFileError, as_recorded, is_complete, open_run
from mckmpi.trace.schema import PARTIAL_SUFFIX
from mckmpi.utility.table import counted, render

STUDY_SCHEMA = "mckmpi.study"
STUDY_VERSION = 3
#: Version 3 stores the tables one dataset per column (versions 1 and 2: compound datasets).
STUDY_DIMENSIONS = {"runs": ("run",), "points": ("point_metric",)}
#: Columns version 2 added (completeness, points, repeats, axes, baselines, stamps,
#: predictions); a version 1 file is read with them filled in.
V2_COLUMNS = ("complete", "ending", "point", "repeat", "axes", "baseline_mode", "host",
              "cluster", "commit", "predicted_iter_us", "prediction_error")

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
        ("point", "S128"),  # the study point the run belongs to
        ("repeat", "i4"),  # its repeat index, -1 unknown
        ("axes", "S256"),  # the point's axis values ("mem=256M app:--size=1024"), or ""
        ("baseline_mode", "S16"),  # the mode of the run speedup and efficiency are against
        ("host", "S64"),  # the machine of node 0 (provenance), for plot stamps
        ("cluster", "S64"),  # the Slurm cluster, "" outside Slurm
        ("commit", "S48"),  # the source commit the run was made with
        ("predicted_iter_us", "f8"),  # what `simulate` predicted from the smallest points
        ("prediction_error", "f8"),  # (predicted - measured) / measured
    ]
)

#: Metrics of a run that repeats summarise (columns of `STUDY_DTYPE`).
METRICS = ("iter_us", "wall_s", "fwq_p999_us", "noise_pct", "speedup", "efficiency",
           "predicted_iter_us")

#: One row per point and metric: the repeats' median and 95% interval (`repeats`).
POINTS_DTYPE = np.dtype(
    [
        ("point", "S128"),
        ("app", "S64"),
        ("mode", "S16"),
        ("scaling", "S16"),
        ("nodes", "i4"),
        ("ranks", "i4"),
        ("size", "S32"),
        ("axes", "S256"),
        ("metric", "S32"),
        ("n", "i4"),
        ("median", "f8"),
        ("mean", "f8"),
        ("ci_low", "f8"),
        ("ci_high", "f8"),
    ]
)


class StudyFileError(UsageError):
    """A file that is not a readable study file."""


@dataclass
class Collected:
    rows: np.ndarray
    skipped: list[tuple[Path, str]]


def row_of(s: RunSummary, root: Path) -> np.void:
    """One study-table row of a summarised run file (`root`: paths are relative to it)."""
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
    prov = s.provenance
    row["axes"] = str(prov.get("study_axes", "")).encode()[:256]
    row["point"] = str(prov.get("study_point") or derived_point(row)).encode()[:128]
    repeat = str(prov.get("study_repeat", ""))
    row["repeat"] = int(repeat) if repeat.isdigit() else -1
    hosts = list(prov.get("node_hostname") or [])
    row["host"] = str(hosts[0] if hosts else (prov.get("hosts") or [""])[0]).encode()[:64]
    row["cluster"] = str(prov.get("slurm_cluster", "")).encode()[:64]
    row["commit"] = str(prov.get("source_commit", "")).encode()[:48]
    row["predicted_iter_us"] = row["prediction_error"] = math.nan
    return row


def derived_point(row: np.void | np.ndarray) -> str:
    """A point name for a run that was not planned as part of a study."""
    def s(key: str) -> str:
        value = np.asarray(row[key]).item()
        return value.decode(errors="replace") if isinstance(value, bytes) else str(value)

    parts = [s("app"), s("scaling"), s("mode"), f"n{int(row['nodes'])}", f"r{int(row['ranks'])}"]
    if s("size"):
        parts.append(f"s{s('size')}")
    return "-".join(p for p in parts if p)


def points(rows: np.ndarray) -> np.ndarray:
    """Median and 95% interval of every metric over the repeats of each point (complete
    runs only: a partial run is not a repeat)."""
    from mckmpi.analysis.repeats import interval

    out = []
    rows = rows[rows["complete"] != 0]
    keys = sorted({(bytes(r["point"]), bytes(r["axes"])) for r in rows})
    for point, axes in keys:
        mine = rows[(rows["point"] == point) & (rows["axes"] == axes)]
        first = mine[0]
        for metric in METRICS:
            iv = interval(mine[metric])
            if iv.n == 0:
                continue
            rec = np.zeros((), dtype=POINTS_DTYPE)
            for key in ("point", "app", "mode", "scaling", "nodes", "ranks", "size", "axes"):
                rec[key] = first[key]
            rec["metric"] = metric.encode()
            rec["n"], rec["median"], rec["mean"] = iv.n, iv.median, iv.mean
            rec["ci_low"], rec["ci_high"] = iv.low, iv.high
            out.append(rec)
    return np.array(out, dtype=POINTS_DTYPE)


def collect(directory: str | Path) -> Collected:
    """Summarise every complete run file under `directory` (recursively), sorted by path."""
    root = Path(directory)
    if not root.is_dir():
        raise UsageError(f"not a directory: {root}")
    rows, skipped = [], []
    for path in run_files(root):
        try:
            with open_run(path, allow_incomplete=path.name.endswith(PARTIAL_SUFFIX)) as run:
                rows.append(row_of(summarize(run), root))
        except RunFileError as exc:
            if not _is_study_file(path):  # a study file collected from here earlier
                skipped.append((path, str(exc).removeprefix(f"{path}: ")))
    if not rows:
        why = (
            f" ({counted(len(skipped), 'file')} skipped, e.g. {skipped[0][0]}: {skipped[0][1]})"
            if skipped
            else ""
        )
        raise UsageError(f"no complete run files under {root}{why}")
    table = np.array(rows, dtype=STUDY_DTYPE)
    scaling.apply(table)
    predict(table, root)
    return Collected(table, skipped)


def _is_study_file(path: Path) -> bool:
    try:
        with h5py.File(path, "r") as f:
            schema = f.attrs.get("schema", "")
    except (OSError, ValueError):
        return False
    return (schema.decode(errors="replace") if isinstance(schema, bytes) else schema) == STUDY_SCHEMA


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
    """Write the study file (replacing it atomically): the runs and, per point, the
    repeats' median and interval of every metric."""
    from mckmpi.analysis.repeats import CI_METHOD

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + PARTIAL_SUFFIX)
    with h5py.File(tmp, "w") as f:
        f.attrs["schema"] = STUDY_SCHEMA
        f.attrs["schema_version"] = STUDY_VERSION
        f.attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        f.attrs["source"] = source
        write_table(f, "runs", rows)
        write_table(f, "points", points(rows))
        f["points"].attrs["ci_method"] = CI_METHOD
        label(f, STUDY_DIMENSIONS)
    tmp.replace(path)
    return path


def read_points(path: str | Path) -> np.ndarray:
    """The per-point table of a study file (computed from its runs for older files)."""
    rows = read(path)
    with h5py.File(path, "r") as f:
        if "points" in f:
            return _table(Path(path), f, "points")
    return points(rows)


def _table(path: Path, f: h5py.File, key: str) -> np.ndarray:
    """A table of a study file, whatever its version's layout."""
    try:
        return as_recorded(path, key, f[key])[()]
    except RunFileError as exc:
        raise StudyFileError(str(exc)) from None


def rows_of(path: str | Path) -> np.ndarray:
    """The study table of a run file, a study file or a directory of run files."""
    path = Path(path)
    if path.is_dir():
        return collect(path).rows
    if not path.is_file():
        raise UsageError(f"no such run file, study file or directory: {path}")
    try:
        with h5py.File(path, "r") as f:
            schema = f.attrs.get("schema")
    except OSError:
        raise UsageError(f"{path}: not an HDF5 run or study file") from None
    if (schema.decode() if isinstance(schema, bytes) else schema) == STUDY_SCHEMA:
        return read(path)
    with open_run(path) as run:
        rows = np.array([row_of(summarize(run), path.parent)], dtype=STUDY_DTYPE)
    scaling.apply(rows)
    return rows


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
            rows = _table(path, f, "runs")
    except (OSError, KeyError) as exc:
        raise StudyFileError(f"{path}: not a readable study file ({exc})") from None
    missing = set(STUDY_DTYPE.names or ()) - set(rows.dtype.names or ())
    if missing - set(V2_COLUMNS):
        raise StudyFileError(f"{path}: study table lacks columns {sorted(missing)}")
    if missing:  # a version 1 file: no points, repeats or predictions recorded
        full = np.zeros(rows.shape, dtype=STUDY_DTYPE)
        for name in rows.dtype.names or ():
            full[name] = rows[name]
        for name in ("predicted_iter_us", "prediction_error"):
            full[name] = math.nan
        full["repeat"] = -1
        if "complete" in missing:  # version 1 collected complete run files only
            full["complete"] = 1
        for i, r in enumerate(full):
            full["point"][i] = derived_point(r).encode()[:128]
        rows = full
    return rows


def points_text(pts: np.ndarray) -> str:
    """Per point: the repeats' median and 95% interval of the time, noise and efficiency."""
    from mckmpi.analysis.repeats import CI_METHOD

    def cell(point: bytes, metric: str) -> str:
        sel = pts[(pts["point"] == point) & (pts["metric"] == metric.encode())]
        if not len(sel):
            return "-"
        r = sel[0]
        ci = "" if not math.isfinite(r["ci_low"]) else f" [{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]"
        return f"{fmt(float(r['median']))}{ci}"

    names = list(dict.fromkeys(bytes(p) for p in pts["point"]))
    rows = []
    for name in names:
        first = pts[pts["point"] == name][0]
        n = int(max(pts[pts["point"] == name]["n"]))
        rows.append([name.decode(errors="replace"), first["axes"].decode() or "-", n,
                     cell(name, "iter_us"), cell(name, "wall_s"), cell(name, "efficiency"),
                     cell(name, "fwq_p999_us"), cell(name, "noise_pct")])
    return render(("point", "axes", "runs", "iter us", "wall s", "efficiency", "fwq p99.9 us",
                   "noise %"), rows,
                  title=f"points: median of the repeats [95% CI: {CI_METHOD}]")


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
            num(float(r["predicted_iter_us"])),
            num(float(r["prediction_error"]) * 100),
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
            "predicted us",
            "pred. error %",
            "fwq p99.9 us",
            "noise %",
            "verified",
            "ending",
            "file",
        ),
        table,
        title=f"study: {counted(len(rows), 'run')} (speedup and efficiency against linux mode's "
        f"fewest ranks of each problem, else the series' own; partial runs of jobs that did not "
        f"finish are not counted)",
    )


def source_of(path: str | Path) -> Path:
    """The directory a study file was collected from (its run paths are relative to it)."""
    with h5py.File(path, "r") as f:
        source = f.attrs.get("source", "")
    return Path(source.decode() if isinstance(source, bytes) else str(source))


def survey_nodes(rows: np.ndarray, source: Path) -> tuple[str, list[tuple[str, int, str, np.ndarray]]]:
    """The noise of every node of a noise survey's runs, for `plots.survey_plots`: what was
    measured ('FWQ excess' or 'detour duration') and per node (mode, the run's node count,
    node label, histogram on `LOG_EDGES_NS`). Runs whose file is gone are left out."""
    from mckmpi.analysis.noise import DETOURS, FWQ, fwq
    from mckmpi.analysis.stats import LOG_EDGES_NS
    from mckmpi.provenance import nodes_of

    out: list[tuple[str, int, str, np.ndarray]] = []
    what = ""
    for row in rows[np.lexsort((rows["path"], rows["repeat"], rows["axes"], rows["nodes"]))]:
        path = Path(row["path"].decode())
        path = path if path.is_absolute() else source / path
        if not path.is_file():
            continue
        with open_run(path) as run:
            if FWQ not in run and DETOURS not in run:
                continue
            node_of = run.ranks["node"]
            names = [n.name for n in nodes_of(run.provenance)]
            per_node: dict[int, np.ndarray] = {}
            if FWQ in run:
                what = "FWQ excess over the rank's minimum"
                for r in fwq(run):
                    if r.histogram is not None:
                        node = int(node_of[r.rank])
                        per_node[node] = per_node.get(node, 0) + r.histogram
            else:
                what = what or "detour duration"
                for rank in range(len(node_of)):
                    durations = run.table(DETOURS, rank)["duration_ns"]
                    counts = np.histogram(durations, LOG_EDGES_NS)[0]
                    node = int(node_of[rank])
                    per_node[node] = per_node.get(node, 0) + counts
        nodes, axes, repeat = int(row["nodes"]), row["axes"].decode(), int(row["repeat"])
        job = "\n".join([f"{nodes}-node job", *axes.replace("app:", "").split(),
                         *([f"repeat {repeat}"] if repeat >= 0 else [])])
        for node, hist in sorted(per_node.items()):
            label = names[node] if node < len(names) else f"node {node}"
            out.append((row["mode"].decode(), nodes, f"{label}\n{job}", np.asarray(hist)))
    return what, out


def plot(study_file: str | Path, rows: np.ndarray, out_dir: Path) -> tuple[list[Path], list[str]]:
    """Every plot of a study: scaling figures of the mini-apps (with predictions where
    collected) and the noise survey figure; each says host, date and commit of its data.
    Returns the files written and notes on what could not be drawn."""
    from mckmpi.analysis import plots

    where = plots.stamp([r.decode() for r in rows["host"]], [r.decode() for r in rows["created"]],
                        [r.decode() for r in rows["commit"]])
    predicted = {(r["app"].decode(), r["mode"].decode(), int(r["ranks"])): float(r["predicted_iter_us"])
                 for r in rows if math.isfinite(r["predicted_iter_us"])}
    written = plots.scaling_plots(scaling.curves(rows[rows["scaling"] != b""]), out_dir, where,
                                  predicted)
    notes = []
    survey = rows[(rows["scaling"] == b"") & (np.isfinite(rows["fwq_p999_us"])
                                              | np.isfinite(rows["noise_pct"]))]
    if len(survey):
        source = source_of(study_file)
        what, nodes = survey_nodes(survey, source)
        apps = "-".join(sorted({a.decode() for a in survey["app"]}))
        if nodes:
            written.append(plots.survey_plots(
                nodes, what, f"noise survey ({apps}): {what} per node and mode", where,
                out_dir / f"survey-{apps}.png"))
        else:
            notes.append(f"no run file of the noise survey found under {source}")
    if not written:
        notes.append("no run with a time or noise samples to plot")
    return written, notes


def _phase_arrays(paths: list[Path], app: str) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, int]:
    """compute, halo, allreduce [rank-rows, iterations] of the runs (repeats stacked, cut to
    the shortest), and the process grid's dimensions."""
    from mckmpi.analysis.predict import PATTERNS

    parts: dict[str, list[np.ndarray]] = {"compute": [], "halo": [], "allreduce": []}
    ndim = 1
    names = ({"halo": "app/halo_ns", "allreduce": "app/comm_ns"} if PATTERNS.get(app, (1, 0))[1]
             else {"halo": "app/comm_ns"})
    for path in paths:
        with open_run(path) as run:
            parts["compute"].append(run.read("app/compute_ns"))
            for part, key in names.items():
                if key in run:
                    parts[part].append(run.read(key))
            grid = str(run.file["app"].attrs.get("process_grid", ""))
            ndim = max(ndim, sum(1 for d in grid.split("x") if d.isdigit() and int(d) > 1))

    def stack(arrays: list[np.ndarray]) -> np.ndarray | None:
        if not arrays:
            return None
        n = min(a.shape[1] for a in arrays)
        return np.concatenate([a[:, :n] for a in arrays]).astype(np.float64)

    compute = stack(parts["compute"])
    assert compute is not None
    return compute, stack(parts["halo"]), stack(parts["allreduce"]), ndim


def predict(rows: np.ndarray, root: Path) -> None:
    """Fill `predicted_iter_us` and `prediction_error` of the stencil and cg series: each
    series' smallest point (its repeats) calibrates `mckmpi.analysis.predict`, which then
    predicts every point of the series from that alone."""
    from mckmpi.analysis.predict import PATTERNS, calibrate, iteration_ns

    series: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows):
        if r["app"].decode() in PATTERNS and r["scaling"] and math.isfinite(r["iter_us"]):
            series.setdefault(scaling.series_key(r), []).append(i)
    for k, members in series.items():
        app, kind = k[0], k[2]
        by_ranks: dict[int, list[int]] = {}
        for i in members:
            by_ranks.setdefault(int(rows["ranks"][i]), []).append(i)
        if len(by_ranks) < 2:
            continue  # nothing larger to predict
        p0 = min(by_ranks)
        pc = min((p for p in by_ranks if p >= 2), default=None)
        if pc is None:
            continue

        def files(p: int) -> list[Path]:
            return [root / rows["path"][i].decode() for i in by_ranks[p]]

        try:
            compute, _, _, ndim = _phase_arrays(files(p0), app)
            _, halo, allreduce, _ = _phase_arrays(files(pc), app)
        except (RunFileError, KeyError, OSError):
            continue  # runs without per-phase times (or gone): no prediction
        cal = calibrate(app, compute, halo, allreduce, p0, ndim, comm_ranks=pc)
        for p, idx in sorted(by_ranks.items()):
            work = cal.work_ns if kind == "weak" else cal.work_ns * p0 / p
            predicted = iteration_ns(cal, p, work) / 1e3
            for i in idx:
                rows["predicted_iter_us"][i] = predicted
                rows["prediction_error"][i] = (predicted - rows["iter_us"][i]) / rows["iter_us"][i]


#: Units of the study table's columns (their names carry them too).
STUDY_UNITS = {"wall_s": "s", "iter_us": "us", "fwq_p999_us": "us", "noise_pct": "%",
               "global_size": "1", "iterations": "1", "speedup": "1", "efficiency": "1"}


@dataclass
class Study:
    """A study for notebooks: its runs (one row per run file) and its points (per point and
    metric, the repeats' median and 95% interval), from a directory of run files
    (summarised now, as `collect` does) or from a study file."""

    source: Path
    root: Path  # what the rows' `path` column is relative to
    rows: np.ndarray
    skipped: list[tuple[Path, str]]

    def to_pandas(self, name: str = "runs") -> Any:
        """The `runs` table (default) or the `points` summary as a `pandas.DataFrame` (text
        decoded; units in ``attrs``)."""
        from mckmpi.trace.frames import columns, need

        if name not in ("runs", "points"):
            raise UsageError(f"a study has two tables, 'runs' and 'points' (not {name!r})")
        table = self.rows if name == "runs" else points(self.rows)
        frame = need("pandas").DataFrame(columns(table))
        frame.attrs["units"] = dict(STUDY_UNITS)
        frame.attrs["source"] = str(self.source)
        return frame

    def to_xarray(self) -> Any:
        """The runs as an `xarray.Dataset` along dimension ``run``."""
        from mckmpi.trace.frames import columns, need

        xr = need("xarray")
        data = {k: xr.Variable(("run",), v, {"units": STUDY_UNITS[k]} if k in STUDY_UNITS else {})
                for k, v in columns(self.rows).items()}
        return xr.Dataset(data, coords={"run": np.arange(len(self.rows))},
                          attrs={"source": str(self.source)})

    def run_paths(self) -> list[Path]:
        """The run file of every run, in row order."""
        return [self.root / p.decode(errors="replace") for p in self.rows["path"].tolist()]


def open_study(path: str | Path) -> Study:
    """A directory of run files (every run file becomes a run, partial ones marked; what
    is not a run file is listed in `skipped`) or a study file written by `mckmpi study
    collect`."""
    path = Path(path)
    if path.is_dir():
        found = collect(path)
        return Study(path, path, found.rows, found.skipped)
    rows = read(path)
    with h5py.File(path, "r") as f:
        source = f.attrs.get("source", "")
    source = source.decode() if isinstance(source, bytes) else str(source)
    return Study(path, Path(source) if source else path.parent, rows, [])
