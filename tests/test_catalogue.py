"""The catalogue of runs: indexing real run files (complete, partial, corrupt, foreign),
jobs finishing at the same moment, filters, trends with their noise band, export, the CLI,
and `mckmpi run` adding its run without ever failing for it."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from fixtures import APPS, mckmpi, mpirun

from mckmpi.analysis import catalogue
from mckmpi.analysis.catalogue import Entry, Filters
from mckmpi.node import host
from mckmpi.trace.reader import open_run


@pytest.fixture
def runs_dir(result_runs, tmp_path) -> Path:
    """A results directory with copies of the session's run files (no catalogue yet)."""
    d = tmp_path / "results"
    d.mkdir()
    for name in ("fwq-linux", "fwq-lwk", "stencil-linux", "checkpoint-lwk"):
        shutil.copy(result_runs[name], d / f"{name}.h5")
    return d


def test_mckmpi_run_added_its_runs_to_the_catalogue(result_runs):
    directory = next(iter(result_runs.values())).parent
    runs = catalogue.query(directory)
    assert sorted(Path(r["path"]).stem for r in runs) == sorted(result_runs)
    lwk = next(r for r in runs if r["path"] == "fwq-lwk.h5")
    assert (lwk["app"], lwk["mode"], lwk["ranks"], lwk["complete"]) == ("fwq", "lwk", 1, 1)
    assert lwk["options"]["app:--samples"] == "200" and lwk["options"]["mode"] == "lwk"
    assert lwk["metrics"]["fwq_p999_us"] > 0 and lwk["metrics"]["offload_calls"] >= 0
    with open_run(directory / "fwq-lwk.h5") as run:
        assert lwk["provenance"]["hosts"] == run.provenance["hosts"]
        assert lwk["provenance"]["numpy"] == run.provenance["numpy"]


def test_index_is_incremental_and_counts_corrupt_foreign_and_partial_files(runs_dir):
    (runs_dir / "corrupt.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    with h5py.File(runs_dir / "foreign.h5", "w") as f:
        f["x"] = np.arange(3)
    sub = runs_dir / "old"
    sub.mkdir()
    shutil.copy(runs_dir / "stencil-linux.h5", sub / "stencil-linux.h5.partial")
    with h5py.File(sub / "stencil-linux.h5.partial", "r+") as f:
        f.attrs["complete"] = False
    proc = mckmpi("runs", "index", str(runs_dir))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 2 and all(line.startswith("skipped  ") for line in lines)
    assert "corrupt.h5: not a readable HDF5 file" in proc.stderr
    assert "foreign.h5: not an mckmpi run file" in proc.stderr
    assert "5 added, 0 updated, 0 unchanged, 0 removed, 2 skipped" in proc.stdout
    partial = catalogue.query(runs_dir, Filters(app="stencil"))
    assert sorted((r["path"], r["complete"]) for r in partial) == [
        ("old/stencil-linux.h5.partial", 0), ("stencil-linux.h5", 1)]
    assert catalogue.query(runs_dir, Filters(app="stencil", complete_only=True))[0]["metrics"]
    again = mckmpi("runs", "index", str(runs_dir))
    assert again.stderr == "" and "0 added, 0 updated, 5 unchanged, 0 removed, 2 skipped" in again.stdout
    (sub / "stencil-linux.h5.partial").unlink()
    (runs_dir / "corrupt.h5").unlink()
    time.sleep(0.01)
    (runs_dir / "fwq-linux.h5").touch()
    done = catalogue.index(runs_dir)
    assert (done.updated, done.unchanged, done.removed, done.skipped_before) == (["fwq-linux.h5"], 3, 2, 1)
    with sqlite3.connect(runs_dir / catalogue.CATALOGUE) as db:
        assert db.execute("SELECT path FROM skipped").fetchall() == [("foreign.h5",)]


@pytest.mark.parametrize("filesystem, journal", [("ext4", "wal"), ("lustre", "delete")])
def test_eight_jobs_finishing_at_once_lose_no_row(runs_dir, tmp_path, monkeypatch, filesystem,
                                                  journal):
    """8 processes, started together, each add 3 runs while a user indexes the directory:
    every row arrives once, nothing is locked, with WAL and with the rollback journal of
    network file systems."""
    monkeypatch.setattr(catalogue, "filesystem_of", lambda path: filesystem)
    out = tmp_path / "busy"
    out.mkdir()
    names = [f"job{j}-run{i}.h5" for j in range(8) for i in range(3)]
    for name in names:
        shutil.copy(runs_dir / "fwq-linux.h5", out / name)
    start = time.time() + 2.0
    code = ("import sys, time; from mckmpi.analysis import catalogue\n"
            "from mckmpi.analysis.catalogue import add_finished_run\n"
            f"catalogue.filesystem_of = lambda path: {filesystem!r}\n"
            "time.sleep(max(0, float(sys.argv[1]) - time.time()))\n"
            "for p in sys.argv[2:]:\n"
            "    w = add_finished_run(p)\n"
            "    if w: print(w, file=sys.stderr)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(start),
                               *[str(out / n) for n in names[3 * j:3 * j + 3]]],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for j in range(8)]
    indexer = code.replace("for p in sys.argv[2:]:\n    w = add_finished_run(p)\n",
                           "for w in catalogue.index(sys.argv[2]).skipped:\n")
    assert indexer != code
    procs.append(subprocess.Popen([sys.executable, "-c", indexer, str(start), str(out)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert all(err == "" for _, err in results), [err for _, err in results if err]
    rows = catalogue.query(out)
    assert sorted(r["path"] for r in rows) == sorted(names)  # each once
    with sqlite3.connect(out / catalogue.CATALOGUE) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == (journal,)
    assert all(r["metrics"]["fwq_p999_us"] > 0 for r in rows)


def test_a_job_indexed_while_running_leaves_one_row_when_it_ends(runs_dir):
    """`runs index` meets the partial file of a job still running; the job then ends (its
    file renamed complete) and adds itself: one row, the complete one, whatever the order."""
    running = runs_dir / "job.h5.partial"
    shutil.copy(runs_dir / "fwq-linux.h5", running)
    with h5py.File(running, "r+") as f:
        f.attrs["complete"] = False
    catalogue.index(runs_dir)
    assert [r["complete"] for r in catalogue.query(runs_dir, Filters(app="fwq", mode="linux"))
            if r["path"].startswith("job")] == [0]
    running.rename(runs_dir / "job.h5")
    with h5py.File(runs_dir / "job.h5", "r+") as f:
        f.attrs["complete"] = True
    assert catalogue.add_finished_run(runs_dir / "job.h5") is None
    jobs = [(r["path"], r["complete"]) for r in catalogue.query(runs_dir) if r["path"].startswith("job")]
    assert jobs == [("job.h5", 1)]
    # a late store of the partial entry (an index that read it before the rename) adds nothing
    late = catalogue.read_entry(runs_dir / "fwq-linux.h5", runs_dir)
    late.path = "job.h5.partial"
    with catalogue.connect(runs_dir) as db:
        assert catalogue.store(db, late) is False
    jobs = [(r["path"], r["complete"]) for r in catalogue.query(runs_dir) if r["path"].startswith("job")]
    assert jobs == [("job.h5", 1)]


def _entry(i: int, value: float, *, app: str = "fwq", mode: str = "lwk", host: str = "n1",
           commit: str = "abc123", mem: str = "64M", day: int = 1, cluster: str = "") -> Entry:
    created = f"2026-11-{day:02d}T{i // 60:02d}:{i % 60:02d}:00+0000"
    fields = {"schema_version": 2, "app": app, "mode": mode, "host": host, "cluster": cluster,
              "system": cluster or host, "commit_id": commit, "version": "0.1.0", "created": created,
              "created_s": catalogue._created_s(created), "ranks": 2, "nodes": 1,
              "slurm_job_id": "", "app_args": "--samples 100", "command": "",
              "config": f"{app} {mode} mem={mem}", "provenance": '{"kernel": "6.1"}'}
    return Entry(f"{app}-{mode}-{host}-{day}-{i}.h5", 1, i, True, fields,
                 {"fwq_p999_us": value}, {"mem": mem, "app:--samples": "100"})


def _store(directory: Path, entries: list[Entry]) -> None:
    with catalogue.connect(directory) as db:
        for e in entries:
            catalogue.store(db, e)


def test_filters_select_by_app_mode_host_date_commit_and_option(tmp_path):
    _store(tmp_path, [_entry(0, 1.0), _entry(1, 1.0, mode="linux"), _entry(2, 1.0, app="cg"),
                      _entry(3, 1.0, host="n2", commit="def456"), _entry(4, 1.0, mem="1G"),
                      _entry(5, 1.0, day=20), _entry(6, 1.0, host="n1,n7", cluster="c1")])

    def paths(**kw: object) -> list[str]:
        return [r["path"] for r in catalogue.query(tmp_path, Filters(**kw))]
    assert len(paths()) == 7
    assert paths(cluster="c1") == paths(system="c1") == paths(host="n7") == ["fwq-lwk-n1,n7-1-6.h5"]
    assert len(paths(host="n1")) == 6 and paths(host="n") == []
    assert paths(app="cg") == ["cg-lwk-n1-1-2.h5"]
    assert paths(mode="linux") == ["fwq-linux-n1-1-1.h5"]
    assert paths(host="n2") == paths(commit="def") == ["fwq-lwk-n2-1-3.h5"]
    assert paths(options={"mem": "1G"}) == ["fwq-lwk-n1-1-4.h5"]
    assert paths(since="2026-11-10") == ["fwq-lwk-n1-20-5.h5"]
    assert len(paths(until="2026-11-10", app="fwq", options={"app:--samples": "100"})) == 5
    assert len(paths(limit=2)) == 2
    with pytest.raises(catalogue.CatalogueError, match="not a date"):
        paths(since="last week")


def test_trend_flags_points_outside_the_noise_band_of_earlier_repeats(tmp_path):
    values = [10.0, 10.4, 9.8, 10.1, 10.2, 14.0, 9.9, 6.0]
    _store(tmp_path, [_entry(i, v) for i, v in enumerate(values)]
           + [_entry(i, 50.0 + i, host="n2") for i in range(3)])
    by_system = {t.system: t for t in catalogue.trend(tmp_path, "fwq_p999_us")}
    n1 = by_system["n1"].points
    assert [p.value for p in n1] == values
    assert [p.flag for p in n1] == ["", "", "", "", "", "high", "", "low"]
    low, high = catalogue.band(values[:5])
    assert (n1[5].low, n1[5].high) == (low, high) and low < 9.8 and high > 10.4
    assert all(np.isnan(p.low) for p in by_system["n2"].points)  # 3 runs: too few to judge
    proc = mckmpi("runs", "trend", "fwq_p999_us", str(tmp_path), "--host", "n1")
    assert proc.returncode == 0, proc.stderr
    assert "n1: fwq lwk ranks=2 nodes=1 --samples 100 (8 runs, 2 outside)" in proc.stdout
    assert proc.stdout.count("HIGH") == 1 and proc.stdout.count("LOW") == 1


def test_trend_plot_draws_the_series_their_bands_and_the_runs_outside(tmp_path):
    values = [10.0, 10.4, 9.8, 10.1, 10.2, 14.0, 9.9, 6.0]
    _store(tmp_path, [_entry(i, v) for i, v in enumerate(values)]
           + [_entry(i, 50.0 + i, host="n2", day=2) for i in range(4)])
    plots = tmp_path / "plots"
    proc = mckmpi("runs", "trend", "fwq_p999_us", str(tmp_path), "--plots", str(plots))
    assert proc.returncode == 0, proc.stderr
    png = plots / "trend-fwq_p999_us.png"
    assert proc.stdout.splitlines()[-1] == f"plot  {png}"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1100, 528)  # 10 x 4.8 in at 110 dpi

    from mckmpi.analysis import plots as plots_module

    trends = catalogue.trend(tmp_path, "fwq_p999_us")
    fig_path = plots_module.trend("fwq_p999_us", trends, tmp_path / "again.png")
    assert fig_path.read_bytes()[:8] == data[:8]
    flat = [_entry(i, 10.0) for i in range(5)]  # all agree: a band, nothing outside
    (tmp_path / "flat").mkdir()
    _store(tmp_path / "flat", flat)
    proc = mckmpi("runs", "trend", "fwq_p999_us", str(tmp_path / "flat"), "--plots", str(plots))
    assert proc.returncode == 0 and "(5 runs, 0 outside)" in proc.stdout, proc.stderr


def test_trend_plot_to_a_bad_target_is_one_error_line(tmp_path):
    _store(tmp_path, [_entry(i, 1.0) for i in range(3)])
    taken = tmp_path / "taken"
    taken.write_text("a file")
    for target, message in ((taken, f"--plots {taken}: {taken} is a file, not a directory"),
                            (taken / "sub", f"--plots {taken / 'sub'}: {taken} is a file")):
        proc = mckmpi("runs", "trend", "fwq_p999_us", str(tmp_path), "--plots", str(target))
        assert proc.returncode == 2, proc.stdout
        assert proc.stderr.startswith(f"mckmpi: error: {message}"), proc.stderr
        assert len(proc.stderr.splitlines()) == 1 and proc.stdout == ""
    assert taken.read_text() == "a file"


def test_export_csv_and_parquet_and_cli_lines(tmp_path):
    _store(tmp_path, [_entry(i, float(i)) for i in range(4)])
    for fmt in ("csv", "parquet"):
        out = tmp_path / f"runs.{fmt}"
        proc = mckmpi("runs", "export", str(tmp_path), "--format", fmt, "-o", str(out))
        assert proc.returncode == 0 and f"{out}: 4 runs" in proc.stdout, proc.stderr
        frame = pd.read_csv(out) if fmt == "csv" else pd.read_parquet(out)
        assert frame["metric:fwq_p999_us"].tolist() == [0.0, 1.0, 2.0, 3.0]
        assert frame["option:mem"].tolist() == ["64M"] * 4
        assert json.loads(frame["provenance"][0]) == {"kernel": "6.1"}
    proc = mckmpi("runs", "query", str(tmp_path), "--option", "mem=64M", "--limit", "2")
    assert [json.loads(line)["metrics"]["fwq_p999_us"] for line in proc.stdout.splitlines()] == [0, 1]
    listed = mckmpi("runs", "list", str(tmp_path))
    assert listed.returncode == 0 and listed.stdout.startswith("4 runs")
    for args, message in ((("list", str(tmp_path / "none")), "no catalogue in"),
                          (("query", str(tmp_path), "--option", "mem"), "--option wants NAME=VALUE"),
                          (("trend", "nope", str(tmp_path)), "unknown metric 'nope'")):
        proc = mckmpi("runs", *args)
        assert proc.returncode == 2 and proc.stderr.startswith("mckmpi: error: ")
        assert message in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_a_broken_catalogue_never_fails_the_job(tmp_path):
    (tmp_path / catalogue.CATALOGUE).write_bytes(b"not a database" * 100)
    proc = mpirun(1, "run", "--out", str(tmp_path), "--", str(APPS / "fwq.py"), "--samples", "50",
                  "--quantum-us", "100", timeout=90)
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("mckmpi: warning:")]
    assert len(warnings) == 1 and "not added to" in warnings[0], proc.stderr
    assert len(list(tmp_path.glob("fwq-linux-*.h5"))) == 1
    with pytest.raises(sqlite3.DatabaseError):
        sqlite3.connect(tmp_path / catalogue.CATALOGUE).execute("SELECT * FROM runs").fetchall()


def test_catalogue_off_leaves_no_catalogue(tmp_path):
    proc = mpirun(1, "run", "--catalogue", "off", "--out", str(tmp_path), "--", str(APPS / "fwq.py"),
                  "--samples", "50", "--quantum-us", "100", timeout=90)
    assert proc.returncode == 0, proc.stderr
    assert [p.suffix for p in tmp_path.iterdir()] == [".h5"]


def test_cluster_and_commit_come_from_the_provenance(runs_dir):
    with h5py.File(runs_dir / "stencil-linux.h5", "r+") as f:
        f["provenance"].attrs["slurm_cluster"] = "alps"
        f["provenance"].attrs["source_commit"] = "3f2a9c1+dirty"
    catalogue.index(runs_dir)
    (run,) = catalogue.query(runs_dir, Filters(cluster="alps", commit="3f2a"))
    assert (run["path"], run["system"], run["commit_id"]) == ("stencil-linux.h5", "alps", "3f2a9c1+dirty")
    assert run["provenance"]["source_commit"] == "3f2a9c1+dirty"
    others = catalogue.query(runs_dir, Filters(system=run["host"]))
    assert sorted(r["path"] for r in others) == ["checkpoint-lwk.h5", "fwq-linux.h5", "fwq-lwk.h5"]


def test_network_file_systems_get_the_rollback_journal(tmp_path, monkeypatch):
    mounts = tmp_path / "mounts"
    shared = tmp_path / "scratch dir"
    (shared / "results").mkdir(parents=True)
    escaped = str(shared).replace(" ", "\\040")
    mounts.write_text(f"/dev/sda1 / ext4 rw 0 0\nfs0@o2ib:/scratch {escaped} lustre rw 0 0\n"
                      f"tmpfs {tmp_path} tmpfs rw 0 0\n")
    assert host.filesystem_of(shared / "results", mounts) == "lustre"
    assert host.filesystem_of(tmp_path / "other", mounts) == "tmpfs"
    assert host.filesystem_of("/", mounts) == "ext4"
    assert host.filesystem_of("/", tmp_path / "none") == ""
    for kind, journal in (("lustre", "delete"), ("ext4", "wal")):
        monkeypatch.setattr(catalogue, "filesystem_of", lambda path, kind=kind: kind)
        d = tmp_path / kind
        d.mkdir()
        _store(d, [_entry(0, 1.0)])
        with sqlite3.connect(d / catalogue.CATALOGUE) as db:
            assert db.execute("PRAGMA journal_mode").fetchone() == (journal,)
        assert len(catalogue.query(d)) == 1


EXITS_AFTER_SAMPLING = """
import sys
import numpy as np
import mckmpi
mckmpi.context().tracer.array("noise", "fwq_ns", np.arange(1000, 2000, dtype=np.int64), units="ns")
sys.exit(3)
"""


def test_a_run_that_ended_badly_is_indexed_as_partial_with_its_ending(tmp_path):
    app = tmp_path / "exits.py"
    app.write_text(EXITS_AFTER_SAMPLING)
    out = tmp_path / "results"
    proc = mpirun(1, "run", "--out", str(out), "--", str(app), timeout=90)
    assert proc.returncode == 3, proc.stderr
    assert not (out / catalogue.CATALOGUE).exists()  # the job adds only normal endings
    done = catalogue.index(out)
    assert len(done.added) == 1 and done.added[0].endswith(".h5.partial") and not done.skipped
    (run,) = catalogue.query(out)
    assert (run["complete"], run["ending"], run["app"], run["metrics"]) == (0, "exit", "exits", {})
    assert catalogue.query(out, Filters(complete_only=True)) == []
