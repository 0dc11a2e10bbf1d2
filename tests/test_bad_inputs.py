"""One regression test per bad input found by hand: each ends with one clear line, a
non-zero exit, nothing run and nothing written (the fuzzer in test_fuzz_cli.py looks for
the rest)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest

from fixtures import job_env, mckmpi, mpirun
from test_analysis import study_dir, write_synthetic
from test_fuzz_cli import invoke, invoke_subprocess

APP = "import pathlib, sys\npathlib.Path(sys.argv[1]).write_text('ran')\n"


def _one_line(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mckmpi: error: "), proc.stderr
    return lines[0]


@pytest.fixture
def app(tmp_path: Path) -> tuple[Path, Path]:
    """An app that leaves a marker when it runs: a refused run must not run it."""
    path = tmp_path / "marker_app.py"
    path.write_text(APP)
    return path, tmp_path / "ran"


# --- mckmpi run: options, --out, the app --------------------------------------------------


@pytest.mark.parametrize("where", ["cli", "env", "file"])
def test_switch_interval_not_a_number(tmp_path, app, where):
    script, marker = app
    config = tmp_path / "m.toml"
    config.write_text('[lwk]\nswitch_interval = "abc"\n' if where == "file" else "")
    env = job_env(MCKMPI_CONFIG=str(config))
    args = ["run"]
    if where == "cli":
        args += ["--switch-interval", "abc"]
    if where == "env":
        env["MCKMPI_SWITCH_INTERVAL"] = "abc"
    line = _one_line(mckmpi(*args, "--", str(script), str(marker), env=env))
    assert {"cli": "--switch-interval", "env": "MCKMPI_SWITCH_INTERVAL", "file": str(config)}[where] in line
    assert not marker.exists()


def _immutable(path: Path) -> None:
    """A directory nobody may write into, root included (chattr +i), else mode 0555."""
    path.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
            pytest.skip("chattr +i is not supported here")
    else:
        path.chmod(0o555)


def _writable_again(path: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    path.chmod(0o755)


@pytest.mark.parametrize("case,match", [
    ("proc", "cannot write"),
    ("parent-is-a-file", "is a file, not a directory"),
    ("not-hdf5", "exists: run files are never overwritten"),
    ("unwritable", "cannot write"),
    ("directory-named-h5", "is a directory"),
])
def test_out_that_cannot_be_written(tmp_path, app, case, match):
    """Found before the job, not after the app ran; no .partial left."""
    script, marker = app
    out = {
        "proc": Path("/proc/mckmpi-test.h5"),
        "parent-is-a-file": tmp_path / "file" / "x.h5",
        "not-hdf5": tmp_path / "notes.h5",
        "unwritable": tmp_path / "locked" / "x.h5",
        "directory-named-h5": tmp_path / "x.h5",
    }[case]
    if case == "parent-is-a-file":
        (tmp_path / "file").write_text("")
    if case == "not-hdf5":
        out.write_text("my notes")
    if case == "unwritable":
        _immutable(out.parent)
    if case == "directory-named-h5":
        out.mkdir()
    try:
        line = _one_line(mckmpi("run", "--out", str(out), "--", str(script), str(marker)))
    finally:
        if case == "unwritable":
            _writable_again(out.parent)
    assert match in line
    assert not marker.exists()
    assert not list(tmp_path.rglob("*.partial"))
    if case == "not-hdf5":
        assert out.read_text() == "my notes"


def test_missing_module_and_unreadable_app(tmp_path):
    assert "no module named 'no_such_module'" in _one_line(mckmpi("run", "-m", "no_such_module"))
    unreadable = tmp_path / "app.py"
    unreadable.symlink_to("/proc/self/mem")  # opens, but reading offset 0 fails (root too)
    assert "cannot read app" in _one_line(mckmpi("run", "--", str(unreadable)))


def test_relative_executable_keeps_its_dot_slash(tmp_path):
    prog = tmp_path / "prog"
    prog.write_text("#!/bin/sh\necho ran \"$@\"\n")
    prog.chmod(0o755)
    proc = mckmpi("run", "--out", str(tmp_path), "--", "./prog", "a", cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "ran a" in proc.stdout


@pytest.mark.parametrize("option", ["--linux-cores", "--lwk-cores"])
@pytest.mark.parametrize("where", ["cli", "env", "file"])
def test_cpu_list_is_bounded_before_expansion(tmp_path, option, where):
    """0-99999999 once expanded into 8 GB per rank: now one line, in milliseconds."""
    config = tmp_path / "m.toml"
    name = option[2:].replace("-", "_")
    config.write_text(f'[partition]\n{name} = "0-99999999"\n' if where == "file" else "")
    env = {"MCKMPI_CONFIG": str(config)}
    argv = ["run", "--mode", "lwk"]
    if where == "cli":
        argv += [option, "0-99999999"]
    if where == "env":
        env["MCKMPI_" + name.upper()] = "0-99999999"
    outcome = invoke_subprocess([*argv, "--", "/bin/true"], env)
    outcome.check()
    assert "does not exist" in outcome.stderr
    assert outcome.rss_growth < 200 * 1024**2


@pytest.mark.parametrize("value", ["\u00b9", "\u0663", "1\u00b2"])
def test_unicode_digits_are_not_cpu_numbers(value):
    """'¹'.isdigit() is True, int('¹') a ValueError: found by the fuzzer's soak."""
    outcome = invoke(["partition", "show", "--mode", "lwk", "--linux-cores", value])
    outcome.check()
    assert "--linux-cores" in outcome.stderr


def test_oversubscription_has_a_limit():
    """--ranks 10^8 --oversubscribe once listed 10^8 rank plans (minutes, gigabytes)."""
    outcome = invoke(["partition", "show", "--mode", "lwk", "--oversubscribe",
                      "--ranks", str(10**8)])
    outcome.check()
    assert "per CPU" in outcome.stderr


# --- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize("content,match", [
    (b"partition = 3\n", "must be a table"),
    (b"\xff\xfe[partition]\n", "not UTF-8"),
    (b"[ofload]\noffload = 'io'\n", "did you mean 'offload'"),
    (b"[partition]\nlinux_core = '1'\n", "did you mean 'linux_cores'"),
    (b"[run]\nmode = 'lwk'\n", "belongs in [partition]"),
])
def test_config_file_mistakes(tmp_path, content, match):
    config = tmp_path / "m.toml"
    config.write_bytes(content)
    outcome = invoke(["partition", "show"], {"MCKMPI_CONFIG": str(config)})
    outcome.check()
    assert match in outcome.stderr and str(config) in outcome.stderr


def test_config_file_unreadable(tmp_path):
    outcome = invoke(["partition", "show"], {"MCKMPI_CONFIG": str(tmp_path)})
    outcome.check()
    assert "a directory" in outcome.stderr
    unreadable = tmp_path / "m.toml"
    unreadable.symlink_to("/proc/self/mem")  # a file whose reading fails, for root too
    outcome = invoke(["partition", "show"], {"MCKMPI_CONFIG": str(unreadable)})
    outcome.check()
    assert "cannot read the configuration file" in outcome.stderr


# --- post-processing -------------------------------------------------------------------------


@pytest.mark.parametrize("place,name,value,match", [
    ("/", "schema_version", "1", "schema version '1' is not supported"),
    ("/", "world_size", 2.5, "expected an integer"),
    ("/", "schema", [1, 2], "not an mckmpi run file"),
    ("noise/fwq_ns", "units", 7, "expected a string"),
    ("/", "world_size", 2**64 - 1, "more than any job has"),  # once: np.arange(2^64)
])
def test_crafted_attribute_types(tmp_path, place, name, value, match):
    import numpy as np

    path = write_synthetic(tmp_path / "run.h5", fwq=np.arange(1, 100, dtype=np.int64))
    with h5py.File(path, "a") as f:
        f[place].attrs[name] = value
    outcome = invoke(["report", str(path)])
    outcome.check()
    assert match in outcome.stderr


def test_attribute_bytes_that_are_not_utf8_are_replaced(tmp_path):
    """Found by the soak: h5py hands them over as surrogates, which cannot be encoded."""
    import numpy as np

    path = write_synthetic(tmp_path / "run.h5", fwq=np.arange(1, 100, dtype=np.int64),
                           app_attrs={"name": "cg", "global_size": 1000})
    with h5py.File(path, "a") as f:
        f["app"].attrs["global_size"] = np.bytes_(b"\x80")
    outcome = invoke(["study", "collect", str(tmp_path), "-o", str(tmp_path / "study.h5")])
    outcome.check(must_fail=False)
    assert outcome.code == 0, outcome.stderr


def test_plots_into_a_file(tmp_path):
    import numpy as np

    path = write_synthetic(tmp_path / "run.h5", fwq=np.arange(1, 100, dtype=np.int64))
    (tmp_path / "plots").write_text("")
    outcome = invoke(["report", str(path), "--plots", str(tmp_path / "plots")])
    outcome.check()
    assert "is a file, not a directory" in outcome.stderr


def test_report_into_a_closed_pipe(tmp_path):
    """`mckmpi report RUN.h5 | head`: the reader leaves, mckmpi ends quietly."""
    import numpy as np

    path = write_synthetic(tmp_path / "run.h5", fwq=np.arange(1, 10_000, dtype=np.int64))
    proc = subprocess.Popen([sys.executable, "-m", "mckmpi", "report", str(path), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=job_env())
    proc.stdout.close()  # before mckmpi writes a byte
    stderr = proc.stderr.read().decode()
    proc.wait(timeout=60)
    proc.stderr.close()
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr
    assert stderr == "" and proc.returncode == 141


def test_collect_counts_only_complete_runs(tmp_path):
    """A header without data is no run; a .partial (complete=True inside or not) is listed as
    partial, never as a point of a curve."""
    from mckmpi.analysis import study

    runs = study_dir(tmp_path)
    with h5py.File(runs / "schema-only.h5", "w") as f:
        f.attrs.update({"schema": "mckmpi.run", "schema_version": 1, "complete": True})
    shutil.copy(runs / "strong-1.h5", runs / "strong-8.h5.partial")  # complete=True inside
    outcome = invoke(["study", "collect", str(runs), "-o", str(tmp_path / "study.h5")])
    assert outcome.code == 0, outcome.stderr
    assert "schema-only.h5: holds no data" in outcome.stderr
    rows = study.read(tmp_path / "study.h5")
    partial = [r for r in rows if r["path"].decode().endswith(".partial")]
    assert len(partial) == 1 and not partial[0]["complete"]
    assert not any(r["path"].decode().endswith("schema-only.h5") for r in rows)


# --- endings under mpiexec -------------------------------------------------------------------


def test_usage_error_under_mpiexec_always_prints_rank_0s_line():
    """Today's finding: 2 runs in 10 printed nothing (a silent rank's exit took the job
    down before rank 0 had printed)."""
    for _ in range(10):
        proc = mpirun(2, "run", "--vnodes", "x", "--", "/bin/true", timeout=60)
        assert proc.returncode == 2
        # and nothing else: no report of mpiexec's about ranks that exited non-zero
        assert proc.stderr.splitlines() == ["mckmpi: error: --vnodes: not a whole number: 'x'"], (
            proc.stderr)


def test_error_after_mpi_init_is_one_line_without_the_abort_banner(tmp_path):
    app = tmp_path / "bad.py"
    app.write_text("import sys\nsys.exit('bad input: --size must be even')\n")
    start = time.monotonic()
    proc = mpirun(2, "run", "--out", str(tmp_path), "--", str(app), timeout=60)
    assert proc.returncode != 0 and time.monotonic() - start < 30
    assert "MPI_ABORT was invoked" not in proc.stderr, proc.stderr
    assert "bad input: --size must be even" in proc.stderr


# --- the runtime directory -------------------------------------------------------------------


def test_runtime_directory_levels_are_checked(tmp_path, monkeypatch):
    from mckmpi.offload import spawn
    from mckmpi.offload.errors import OffloadError

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    base = tmp_path / f"mckmpi-{os.geteuid()}"
    base.mkdir(mode=0o755)
    base.chmod(0o755)
    path, warning = spawn.runtime_dir("job1", 0, env={})
    assert (path, warning) == (base / "job1-node0", None)
    assert base.stat().st_mode & 0o777 == 0o700  # ours: made private again

    base.rmdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    base.symlink_to(elsewhere)  # a planted link is not our directory
    path, warning = spawn.runtime_dir("job2", 1, env={})
    assert path == tmp_path / f"mckmpi-{os.geteuid()}-job2-node1"
    assert warning is not None and "is not a directory" in warning

    unsafe = tmp_path / "shared"
    unsafe.mkdir()
    unsafe.chmod(0o777)  # writable by others, not sticky: XDG_RUNTIME_DIR is not used
    path, _ = spawn.runtime_dir("job3", 0, env={"XDG_RUNTIME_DIR": str(unsafe)})
    assert unsafe not in path.parents

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / ("x" * 90)))
    (tmp_path / ("x" * 90)).mkdir()
    with pytest.raises(OffloadError, match="longer than the 107 bytes"):
        spawn.runtime_dir("job4", 0, env={})


# --- found by trying the README as a new user ----------------------------------------------


def test_study_collect_never_replaces_a_run_file(tmp_path: Path):
    runs = tmp_path / "runs"
    runs.mkdir()
    target = tmp_path / "one.h5"
    with h5py.File(target, "w") as f:
        f.attrs["schema"] = "mckmpi.run"
    before = target.read_bytes()
    line = _one_line(mckmpi("study", "collect", str(runs), "-o", str(target)))
    assert "a mckmpi.run file, not a mckmpi.study file" in line
    assert target.read_bytes() == before


def test_check_with_a_binary_reference_is_one_line(tmp_path: Path):
    run = tmp_path / "r.h5"
    with h5py.File(run, "w") as f:
        f.attrs["schema"] = "mckmpi.run"
    reference = tmp_path / "ref.toml"
    reference.write_bytes(b"\x89HDF\r\n\x1a\n\xff\xfe")
    line = _one_line(mckmpi("check", str(run), "--reference", str(reference)))
    assert "not UTF-8 text" in line


def test_an_arena_below_one_mib_is_refused_before_mpi(app):
    path, ran = app
    line = _one_line(mckmpi("run", "--mode", "lwk", "--oversubscribe", "--mem", "100", "--",
                            str(path), str(ran)))
    assert "at least 1M" in line or "at least 1 MiB" in line, line
    assert not ran.exists()


def test_runs_query_options_are_spelled_as_the_settings():
    from mckmpi.analysis.catalogue import CatalogueError, option_value

    assert option_value("mem", "256M") == str(256 << 20)
    assert option_value("oversubscribe", "on") == "True"
    assert option_value("app:--samples", "3000") == "3000"
    with pytest.raises(CatalogueError, match="mem"):
        option_value("mem", "lots")


def test_isolate_outside_lwk_mode_is_refused_before_a_run_file_exists(tmp_path: Path, app):
    path, ran = app
    out = tmp_path / "results"
    line = _one_line(mckmpi("run", "--isolate", "--out", str(out), "--", str(path), str(ran)))
    assert "--isolate" in line and not ran.exists()
    assert not out.exists() or not list(out.iterdir())
