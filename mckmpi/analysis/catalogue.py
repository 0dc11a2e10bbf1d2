"""The catalogue of runs: one SQLite file per results directory, for questions across runs.

`index(directory)` adds every run file under the directory (complete and partial ones) with
its provenance, its options and its headline metrics; files already indexed with the same
size and modification time are not read again, files that went away are dropped, and a
corrupt or foreign file is remembered as skipped (with why) so it is counted, not re-read.
`query` filters runs by app, mode, host, cluster, date, commit and any option; `trend`
follows one metric over time per system and configuration and flags the points outside the
noise band of the earlier repeats; `export` writes the table for tools outside Python.

Several jobs may finish at the same moment and each adds its run (`add_run`, called by
`mckmpi run`): the database is in WAL mode (readers never block the writer), each run is
one short ``BEGIN IMMEDIATE`` transaction, SQLite's busy timeout waits for the lock and a
retry loop with jittered back-off covers what the busy handler does not (changing the
journal mode, a lock held past the timeout). The slow part, reading the run file, happens
before the transaction. WAL keeps its index in shared memory, which processes on different
nodes do not share: on a network file system (`NETWORK_FILESYSTEMS`: NFS, Lustre, GPFS,
BeeGFS, ...), where jobs on several nodes write one catalogue, the rollback journal (POSIX
locks) is used instead, with the same timeouts and retries.

This module reads run files through `mckmpi.trace.reader` and `mckmpi.analysis`; it never
imports MPI, the offload or the LWK runtime.
"""

from __future__ import annotations

import json
import math
import random
import re
import shlex
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from mckmpi.analysis.study import run_files
from mckmpi.analysis.summary import plain
from mckmpi.analysis.trends import TREND_MIN_REPEATS, Trend, TrendPoint, band
from mckmpi.errors import UsageError
from mckmpi.node.host import filesystem_of
from mckmpi.trace.reader import RunFileError, open_run
from mckmpi.trace.schema import PARTIAL_SUFFIX

#: The catalogue's file name inside a results directory.
CATALOGUE = "catalogue.sqlite"
CATALOGUE_VERSION = 1
#: SQLite's own wait for a lock (s), then our retries until `RETRY_S` have passed.
BUSY_TIMEOUT_S = 10.0
RETRY_S = 120.0

#: File systems shared between nodes: no WAL there (its shared-memory index is per node).
NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "ceph", "glusterfs",
    "fuse.glusterfs", "fuse.sshfs", "panfs", "orangefs", "pvfs2", "wekafs", "9p", "virtiofs"})

#: Provenance keys that name the cluster or the source commit, in order of preference
#: (root attributes are searched first, then /provenance).
CLUSTER_KEYS = ("cluster", "slurm_cluster", "slurm_cluster_name")
COMMIT_KEYS = ("source_commit", "git_commit", "commit")
#: Options that differ between repeats of one configuration (not part of its identity).
NOT_CONFIG = {"out", "catalogue"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    path TEXT UNIQUE NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    complete INTEGER NOT NULL,
    ending TEXT,
    schema_version INTEGER,
    app TEXT, mode TEXT, host TEXT, cluster TEXT, system TEXT, commit_id TEXT, version TEXT,
    created TEXT, created_s REAL, ranks INTEGER, nodes INTEGER, slurm_job_id TEXT,
    app_args TEXT, command TEXT, config TEXT, provenance TEXT, indexed_s REAL
);
CREATE INDEX IF NOT EXISTS runs_created ON runs (created_s);
CREATE INDEX IF NOT EXISTS runs_app ON runs (app, mode, created_s);
CREATE INDEX IF NOT EXISTS runs_system ON runs (system, created_s);
CREATE INDEX IF NOT EXISTS runs_commit ON runs (commit_id);
CREATE TABLE IF NOT EXISTS metrics (
    run INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    name TEXT NOT NULL, value REAL, PRIMARY KEY (run, name)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS metrics_name ON metrics (name, run);
CREATE TABLE IF NOT EXISTS options (
    run INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    name TEXT NOT NULL, value TEXT, PRIMARY KEY (run, name)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS options_name ON options (name, value);
CREATE TABLE IF NOT EXISTS skipped (
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, reason TEXT);
"""

#: Columns of `runs` a query returns, in order.
RUN_COLUMNS = ("id", "path", "complete", "ending", "app", "mode", "system", "host", "cluster",
               "commit_id", "version", "created", "ranks", "nodes", "slurm_job_id",
               "app_args", "command", "config", "provenance")

T = TypeVar("T")


class CatalogueError(UsageError):
    """The catalogue cannot be opened or written (one line for the user)."""


@dataclass
class Entry:
    """What the catalogue keeps of one run file."""

    path: str  # relative to the catalogue's directory
    size: int
    mtime_ns: int
    complete: bool
    fields: dict[str, Any]
    metrics: dict[str, float]
    options: dict[str, str]


@dataclass
class Indexed:
    """What `index` did."""

    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: int = 0
    removed: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # newly skipped: path, why
    skipped_before: int = 0  # skipped earlier and unchanged since


# --- connection -------------------------------------------------------------------------------


def catalogue_path(directory: str | Path) -> Path:
    return Path(directory) / CATALOGUE


def _retry(what: str, action: Callable[[], T]) -> T:
    """Run `action`, retrying while SQLite says the database is busy or locked."""
    deadline = time.monotonic() + RETRY_S
    delay = 0.01
    while True:
        try:
            return action()
        except sqlite3.OperationalError as exc:
            text = str(exc)
            if "locked" not in text and "busy" not in text:
                raise CatalogueError(f"{what}: {text}") from None
            if time.monotonic() > deadline:
                raise CatalogueError(f"{what}: still locked after {RETRY_S:.0f} s ({text})") from None
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 1.0)


@contextmanager
def connect(directory: str | Path, create: bool = True) -> Iterator[sqlite3.Connection]:
    """An open catalogue of `directory` (created when `create`), closed on exit."""
    path = catalogue_path(directory)
    if not create and not path.is_file():
        raise CatalogueError(f"no catalogue in {directory} (index it: mckmpi runs index {directory})")
    if not Path(directory).is_dir():
        raise CatalogueError(f"not a directory: {directory}")
    try:
        db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    except sqlite3.Error as exc:
        raise CatalogueError(f"{path}: cannot open the catalogue ({exc})") from None
    try:
        db.execute("PRAGMA foreign_keys = ON")
        mode = "DELETE" if filesystem_of(path.parent) in NETWORK_FILESYSTEMS else "WAL"
        _retry(f"{path}", lambda: db.execute(f"PRAGMA journal_mode = {mode}").fetchone())
        db.execute("PRAGMA synchronous = NORMAL")
        _retry(f"{path}", lambda: _create(db))
        yield db
    except sqlite3.DatabaseError as exc:
        raise CatalogueError(f"{path}: not a usable catalogue ({exc})") from None
    finally:
        db.close()


def _create(db: sqlite3.Connection) -> None:
    version = None
    try:
        row = db.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()
        version = None if row is None else int(row[0])
    except sqlite3.OperationalError as exc:
        if "no such table" not in str(exc):
            raise
    if version is not None:
        if version > CATALOGUE_VERSION:
            raise CatalogueError(f"catalogue version {version} is newer than this mckmpi "
                                 f"reads ({CATALOGUE_VERSION}): upgrade mckmpi")
        return
    with _transaction(db):
        for statement in filter(str.strip, _SCHEMA.split(";")):
            db.execute(statement)
        db.execute("INSERT OR IGNORE INTO meta VALUES ('version', ?)", (str(CATALOGUE_VERSION),))


@contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One write transaction; on any failure, the commit's included (a busy COMMIT under the
    rollback journal), it is rolled back so that a retry starts afresh."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


# --- reading one run file ------------------------------------------------------------------------


def _first(keys: Iterable[str], *sources: dict[str, Any]) -> str:
    for source in sources:
        for key in keys:
            value = source.get(key)
            if value not in (None, ""):
                return str(value)
    return ""


def _created_s(created: str) -> float | None:
    try:
        return datetime.strptime(created, "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except ValueError:
        try:
            return datetime.fromisoformat(created).timestamp()
        except ValueError:
            return None


_SETTING = re.compile(r"^([^=]+)=(.*) \(([^()]*)\)$")


def _options(provenance: dict[str, Any], app_args: str) -> dict[str, str]:
    """`mckmpi run` settings (``NAME=VALUE (origin)``) and app arguments (``app:--NAME``)."""
    options = {}
    settings = provenance.get("settings", [])
    for line in [settings] if isinstance(settings, str) else settings:
        m = _SETTING.match(str(line))
        if m:
            options[m.group(1)] = m.group(2)
    try:
        words = shlex.split(app_args)
    except ValueError:
        words = app_args.split()
    i = 0
    while i < len(words):
        word = words[i]
        if word.startswith("-"):
            name, eq, value = word.partition("=")
            if not eq:
                takes = i + 1 < len(words) and not words[i + 1].startswith("--")
                value = words[i + 1] if takes else "true"
                i += takes
            options[f"app:{name}"] = value
        i += 1
    return options


#: The headline metrics a complete run is catalogued with (when it has them).
METRICS = ("wall_s", "iter_us", "fwq_p50_us", "fwq_p999_us", "fwq_max_us", "noise_pct",
           "verified", "offload_calls", "offload_p50_us")


def _metrics(run: Any, root: Path) -> dict[str, float]:
    """Headline numbers of a complete run (the study table's, and the offload latency)."""
    from mckmpi.analysis import study
    from mckmpi.analysis.summary import summarize

    s = summarize(run)
    row = study.row_of(s, root)
    out = {name: float(row[name]) for name in ("wall_s", "iter_us", "fwq_p999_us", "noise_pct")}
    if int(row["verified"]) >= 0:
        out["verified"] = float(row["verified"])
    fwq = [r for r in s.fwq if r.samples]
    if fwq:
        out["fwq_p50_us"] = max(r.p50_ns for r in fwq) / 1e3
        out["fwq_max_us"] = max(r.max_ns for r in fwq) / 1e3
    if s.calls:
        out["offload_calls"] = float(sum(c.count for c in s.calls))
        out["offload_p50_us"] = max(c.p50_ns for c in s.calls) / 1e3
    return {k: v for k, v in out.items() if math.isfinite(v)}


def read_entry(path: Path, root: Path) -> Entry:
    """The catalogue entry of the run file `path` (a `RunFileError` if it is not one)."""
    stat = path.stat()
    with open_run(path, allow_incomplete=True) as run:
        a, p = run.attrs, run.provenance
        complete = not run.partial
        hosts = p.get("hosts", [])
        host = ",".join(hosts) if isinstance(hosts, list) else str(hosts)
        cluster = _first(CLUSTER_KEYS, a, p)
        app_args = str(a.get("app_args", ""))
        options = _options(p, app_args)
        created = str(a.get("created", ""))
        fields = {
            "ending": str(a.get("ending", "")),  # how the job ended ("" before endings existed)
            "schema_version": a.get("schema_version"),
            "app": Path(str(a.get("app", ""))).stem,
            "mode": str(a.get("mode", "")),
            "host": host,
            "cluster": cluster,
            "system": cluster or host,
            "commit_id": _first(COMMIT_KEYS, a, p),
            "version": str(p.get("mckmpi", "")),
            "created": created,
            "created_s": _created_s(created),
            "ranks": int(a.get("world_size") or 0),
            "nodes": int(a.get("nnodes") or 0),
            "slurm_job_id": str(a.get("slurm_job_id", "")),
            "app_args": app_args,
            "command": str(a.get("command", "")),
            # versions, kernel, node plans, ... (the settings are the options)
            "provenance": json.dumps(plain({k: v for k, v in p.items() if k != "settings"}),
                                     sort_keys=True),
        }
        config = {k: v for k, v in options.items() if k not in NOT_CONFIG}
        fields["config"] = " ".join(
            [f"{fields['app']} {fields['mode']} ranks={fields['ranks']} nodes={fields['nodes']}"]
            + [f"{k}={v}" for k, v in sorted(config.items())])
        try:
            metrics = _metrics(run, root) if complete else {}
        except (RunFileError, KeyError, ValueError, OSError) as exc:
            raise RunFileError(f"{path}: cannot summarise ({exc})") from None
    return Entry(_relative(path, root), stat.st_size, stat.st_mtime_ns, complete, fields,
                 metrics, options)


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path.resolve())


# --- writing ---------------------------------------------------------------------------------


def store(db: sqlite3.Connection, e: Entry) -> bool:
    """Add (or replace) one entry, in one short transaction; False when it was not added. A
    run's complete file supersedes its partial one, whichever is stored first: an index that
    met the partial file of a job still running and the job's own add at its end leave one
    row, the complete one."""
    partial = e.path.endswith(PARTIAL_SUFFIX)
    sibling = e.path.removesuffix(PARTIAL_SUFFIX) if partial else e.path + PARTIAL_SUFFIX

    def write() -> bool:
        with _transaction(db):
            db.execute("DELETE FROM runs WHERE path = ?", (e.path,))
            db.execute("DELETE FROM skipped WHERE path = ?", (e.path,))
            if partial and db.execute("SELECT 1 FROM runs WHERE path = ?", (sibling,)).fetchone():
                return False
            db.execute("DELETE FROM runs WHERE path = ?", (sibling,))
            names = ["path", "size", "mtime_ns", "complete", *e.fields, "indexed_s"]
            values = [e.path, e.size, e.mtime_ns, int(e.complete), *e.fields.values(), time.time()]
            cur = db.execute(f"INSERT INTO runs ({', '.join(names)}) VALUES "
                             f"({', '.join('?' * len(names))})", values)
            run = cur.lastrowid
            db.executemany("INSERT INTO metrics VALUES (?, ?, ?)",
                           [(run, k, v) for k, v in sorted(e.metrics.items())])
            db.executemany("INSERT INTO options VALUES (?, ?, ?)",
                           [(run, k, v) for k, v in sorted(e.options.items())])
        return True

    return _retry(f"cannot add {e.path} to the catalogue", write)


def _skip(db: sqlite3.Connection, rel: str, size: int, mtime_ns: int, reason: str) -> None:
    def write() -> None:
        with _transaction(db):
            db.execute("DELETE FROM runs WHERE path = ?", (rel,))
            db.execute("INSERT OR REPLACE INTO skipped VALUES (?, ?, ?, ?)",
                       (rel, size, mtime_ns, reason))

    _retry(f"cannot record {rel} as skipped", write)


def index(directory: str | Path, files: Iterable[str | Path] | None = None) -> Indexed:
    """Add new and changed run files under `directory` (or just `files`) to its catalogue;
    with no `files`, also drop entries whose file is gone."""
    root = Path(directory)
    result = Indexed()
    with connect(root) as db:
        known = {p: (s, m) for p, s, m in _retry(
            "cannot read the catalogue", lambda: db.execute(
                "SELECT path, size, mtime_ns FROM runs").fetchall())}
        bad = {p: (s, m) for p, s, m in _retry(
            "cannot read the catalogue", lambda: db.execute(
                "SELECT path, size, mtime_ns FROM skipped").fetchall())}
        paths = run_files(root) if files is None else [Path(f) for f in files]
        seen = set()
        for path in paths:
            rel = _relative(path, root)
            seen.add(rel)
            try:
                stat = path.stat()
            except OSError as exc:
                result.skipped.append((rel, f"cannot stat ({exc.strerror})"))
                continue
            now = (stat.st_size, stat.st_mtime_ns)
            if known.get(rel) == now:
                result.unchanged += 1
                continue
            if bad.get(rel) == now:
                result.skipped_before += 1
                continue
            try:
                entry = read_entry(path, root)
            except RunFileError as exc:
                reason = str(exc).removeprefix(f"{path}: ")
                _skip(db, rel, *now, reason)
                result.skipped.append((rel, reason))
                continue
            if store(db, entry):
                (result.updated if rel in known else result.added).append(rel)
        if files is None:
            gone = [p for p in list(known) + list(bad) if p not in seen]

            def drop() -> None:
                with _transaction(db):
                    db.executemany("DELETE FROM runs WHERE path = ?", [(p,) for p in gone])
                    db.executemany("DELETE FROM skipped WHERE path = ?", [(p,) for p in gone])

            if gone:
                _retry("cannot update the catalogue", drop)
            result.removed = len(gone)
    return result


def add_run(path: str | Path) -> Indexed:
    """Add one finished run file to the catalogue of its directory."""
    path = Path(path)
    return index(path.parent, [path])


# --- queries -----------------------------------------------------------------------------------


@dataclass
class Filters:
    """Which runs a query selects (empty fields select everything)."""

    app: str = ""
    mode: str = ""
    host: str = ""  # any of the run's hosts contains it
    cluster: str = ""
    system: str = ""
    commit: str = ""  # a prefix of the commit
    since: str = ""  # ISO date or time, inclusive
    until: str = ""  # ISO date or time, exclusive
    options: dict[str, str] = field(default_factory=dict)
    complete_only: bool = False
    limit: int = 0

    def where(self) -> tuple[str, list[Any]]:
        terms, params = [], []
        for column, value in (("app", self.app), ("mode", self.mode), ("cluster", self.cluster),
                              ("system", self.system)):
            if value:
                terms.append(f"r.{column} = ?")
                params.append(value)
        if self.host:
            terms.append("instr(',' || r.host || ',', ?) > 0")
            params.append(f",{self.host},")
        if self.commit:
            terms.append("r.commit_id LIKE ? ESCAPE '\\'")
            params.append(self.commit.replace("\\", "\\\\").replace("%", "\\%")
                          .replace("_", "\\_") + "%")
        for bound, op in ((self.since, ">="), (self.until, "<")):
            if bound:
                terms.append(f"r.created_s {op} ?")
                params.append(_when(bound))
        for name, value in sorted(self.options.items()):
            # as given, or as the run's settings record it (--mem 256M is 268435456)
            terms.append("EXISTS (SELECT 1 FROM options o WHERE o.run = r.id AND o.name = ? "
                         "AND o.value IN (?, ?))")
            params += [name, value, option_value(name, value)]
        if self.complete_only:
            terms.append("r.complete = 1")
        return (" WHERE " + " AND ".join(terms)) if terms else "", params


def _when(text: str) -> float:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise CatalogueError(f"not a date or time: {text!r} (e.g. 2026-11-30 or "
                             "2026-11-30T06:00)") from None
    return moment.timestamp()


def option_value(name: str, text: str) -> str:
    """A `--option NAME=VALUE` filter's value spelled as runs record their settings: `mem`
    256M as 268435456, a switch `on` as True (an app argument or an unknown name as given)."""
    from mckmpi import config
    from mckmpi.errors import UsageError

    declared = {o.name: o for o in config.options(*config.RUN_SECTIONS)}.get(name)
    if declared is None:
        return text
    try:
        return str(declared.convert(text, f"--option {name}"))
    except (UsageError, ValueError) as exc:
        raise CatalogueError(str(exc)) from None


def query(directory: str | Path, filters: Filters | None = None) -> list[dict[str, Any]]:
    """Runs of the catalogue of `directory` that match `filters`, oldest first; each a dict
    of the `RUN_COLUMNS` plus ``metrics`` and ``options`` (dicts)."""
    filters = filters or Filters()
    where, params = filters.where()
    sql = (f"SELECT {', '.join('r.' + c for c in RUN_COLUMNS)} FROM runs r{where} "
           "ORDER BY r.created_s, r.path")
    if filters.limit:
        sql += f" LIMIT {int(filters.limit)}"
    with connect(directory, create=False) as db:
        rows = _retry("cannot query the catalogue", lambda: db.execute(sql, params).fetchall())
        runs = {r[0]: dict(zip(RUN_COLUMNS, r), metrics={}, options={}) for r in rows}
        for run in runs.values():
            run["provenance"] = json.loads(run["provenance"] or "{}")
        if runs:
            # the selected ids again as a subquery (or the list when LIMIT cut the selection)
            chosen, chosen_params = (f"SELECT r.id FROM runs r{where}", params) \
                if not filters.limit else (", ".join(str(i) for i in runs), [])
            for table in ("metrics", "options"):
                sql = f"SELECT run, name, value FROM {table} WHERE run IN ({chosen})"
                found = _retry("cannot query the catalogue",
                               lambda sql=sql: db.execute(sql, chosen_params).fetchall())
                for run, name, value in found:
                    runs[run][table][name] = value
    return list(runs.values())


# --- trends -------------------------------------------------------------------------------------


def trend(directory: str | Path, metric: str, filters: Filters | None = None) -> list[Trend]:
    """`metric` over time per system and configuration (runs with the same app, mode, shape
    and options are repeats); each point is judged against the band of the repeats before
    it, once there are `TREND_MIN_REPEATS` of them."""
    if metric not in METRICS:
        raise CatalogueError(f"unknown metric {metric!r} (the catalogue has "
                             f"{', '.join(METRICS)}): mckmpi runs trend METRIC [DIR]")
    series: dict[tuple[str, str], list[tuple[str, str, float]]] = {}
    labels: dict[tuple[str, str], str] = {}
    for run in query(directory, filters):
        value = run["metrics"].get(metric)
        if value is None or not math.isfinite(value):
            continue
        key = (run["system"] or "", run["config"] or "")
        labels[key] = (f"{run['app']} {run['mode']} ranks={run['ranks']} nodes={run['nodes']} "
                       f"{run['app_args']}").strip()
        series.setdefault(key, []).append((run["created"], run["path"], float(value)))
    out = []
    for (system, config), runs in sorted(series.items()):
        points = []
        for i, (created, path, value) in enumerate(runs):
            earlier = [v for _, _, v in runs[:i]]
            low = high = math.nan
            flag = ""
            if len(earlier) >= TREND_MIN_REPEATS:
                low, high = band(earlier)
                flag = "high" if value > high else "low" if value < low else ""
            points.append(TrendPoint(created, path, value, low, high, flag))
        out.append(Trend(system, config, labels[(system, config)], points))
    return out


def metric_names(directory: str | Path) -> list[str]:
    with connect(directory, create=False) as db:
        return [r[0] for r in _retry("cannot query the catalogue", lambda: db.execute(
            "SELECT DISTINCT name FROM metrics ORDER BY name").fetchall())]


# --- export -----------------------------------------------------------------------------------


def flat(runs: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """One flat record per run: run columns (provenance as JSON text), ``metric:NAME`` and
    ``option:NAME`` columns."""
    metrics = sorted({k for r in runs for k in r["metrics"]})
    options = sorted({k for r in runs for k in r["options"]})
    columns = list(RUN_COLUMNS) + [f"metric:{m}" for m in metrics] + [f"option:{o}" for o in options]
    records = []
    for r in runs:
        rec = {c: r[c] for c in RUN_COLUMNS}
        rec["provenance"] = json.dumps(r["provenance"], sort_keys=True)
        rec.update({f"metric:{m}": r["metrics"].get(m) for m in metrics})
        rec.update({f"option:{o}": r["options"].get(o) for o in options})
        records.append(rec)
    return columns, records


def export(directory: str | Path, output: str | Path, fmt: str,
           filters: Filters | None = None) -> int:
    """Write the selected runs as CSV or Parquet (needs pyarrow); returns the row count."""
    import csv

    columns, records = flat(query(directory, filters))
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        with output.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=columns)
            w.writeheader()
            w.writerows(records)
    elif fmt == "parquet":
        from mckmpi.trace.frames import need

        pa = need("pyarrow")
        pq = need("pyarrow.parquet")
        types = {c: pa.float64() if c.startswith("metric:") else
                 pa.int64() if c in ("id", "complete", "ranks", "nodes") else pa.string()
                 for c in columns}
        table = pa.Table.from_pylist(records, schema=pa.schema([(c, types[c]) for c in columns]))
        pq.write_table(table, output)
    else:
        raise CatalogueError(f"unknown export format {fmt!r} (csv or parquet)")
    return len(records)


def add_finished_run(path: str | Path) -> str | None:
    """`add_run` for the end of a job, which indexing must never fail: the warning line to
    print when the run could not be added, else None."""
    path = Path(path)
    try:
        done = add_run(path)
    except Exception as exc:  # any failure here is a warning, never the job's failure
        return f"mckmpi: warning: {path} not added to {catalogue_path(path.parent)}: {exc}"
    if done.skipped:
        return (f"mckmpi: warning: {path} not added to {catalogue_path(path.parent)}: "
                f"{done.skipped[0][1]}")
    return None
