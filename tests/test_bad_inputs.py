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


# --- found by a reviewer after the last landing ----------------------------------------------


def _stale_socket(path: Path) -> Path:
    """A socket file nobody listens on, as a proxy killed by SIGKILL leaves it."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.bind(str(path))
    return path


@pytest.mark.parametrize("case,match", [
    ("directory", "is a directory, not the socket of a proxy"),
    ("file", "is a file, not the socket of a proxy"),
    ("stale-socket", "no proxy listens on this socket"),
    ("parent-is-a-file", "Not a directory"),
    ("no-such-directories", "no proxy can listen there"),
])
def test_offload_proxy_that_cannot_be_is_refused_at_once(tmp_path, app, case, match):
    """--offload-proxy once waited 30 s in silence for a socket that could never be: now
    one line before MPI starts, nothing run, no run file begun."""
    script, marker = app
    proxy = {"directory": tmp_path, "file": tmp_path / "notes.txt",
             "stale-socket": tmp_path / "p.sock", "parent-is-a-file": tmp_path / "notes.txt" / "p",
             "no-such-directories": tmp_path / "no" / "such" / "p.sock"}[case]
    if case in ("file", "parent-is-a-file"):
        (tmp_path / "notes.txt").write_text("")
    if case == "stale-socket":
        _stale_socket(proxy)
    out = tmp_path / "results"
    start = time.monotonic()
    line = _one_line(mckmpi("run", "--offload", "io", "--offload-proxy", str(proxy), "--out",
                            str(out), "--", str(script), str(marker), timeout=60))
    assert time.monotonic() - start < 20  # the wait for a proxy is 30 s
    assert match in line and f"--offload-proxy {proxy}" in line, line
    assert not marker.exists()
    assert not out.exists() or not list(out.iterdir())


@pytest.mark.offload
def test_offload_proxy_not_yet_started_is_waited_for_and_said(tmp_path, app):
    """A proxy started beside the ranks (srun ... mckmpi proxy &) may come a little later:
    the wait is legitimate, and rank 0 says so at once instead of keeping silent."""
    script, marker = app
    socket_path = tmp_path / "later" / "p.sock"
    run = subprocess.Popen([sys.executable, "-m", "mckmpi", "run", "--offload", "io",
                            "--offload-proxy", str(socket_path), "--out", str(tmp_path), "--",
                            str(script), str(marker)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=job_env())
    proxy = None
    try:
        first = run.stderr.readline()
        assert first.startswith("mckmpi: waiting up to 30 s for the offload proxy at "
                                f"{socket_path}"), first
        proxy = subprocess.Popen([sys.executable, "-m", "mckmpi", "proxy", "--socket",
                                  str(socket_path), "--expect", "1", "--remove-dir"],
                                 env=job_env(), stderr=subprocess.PIPE, text=True)
        _, rest = run.communicate(timeout=90)
        assert run.returncode == 0, first + rest
        assert marker.read_text() == "ran"
        assert proxy.wait(timeout=60) == 0, proxy.stderr.read()
    finally:
        for proc in (run, proxy):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
            if proc is not None and proc.stderr is not None:
                proc.stderr.close()
        run.stdout.close()


def test_study_plot_into_a_file_prints_nothing(tmp_path):
    """`study plot --plots FILE` printed the whole table, then refused: validate first."""
    runs = study_dir(tmp_path)
    study_file = tmp_path / "study.h5"
    assert invoke(["study", "collect", str(runs), "-o", str(study_file)]).code == 0
    (tmp_path / "plots").write_text("")
    outcome = invoke(["study", "plot", str(study_file), "--plots", str(tmp_path / "plots")])
    outcome.check()
    assert outcome.stdout == "" and "is a file, not a directory" in outcome.stderr


@pytest.mark.parametrize("axis,match", [
    ("mem=256M,abc", "--axis mem: not a size: 'abc'"),
    ("linux_cores=0-99999999", "--axis linux_cores: CPU 99999999"),
    ("trace_flush=1,-1", "--axis trace_flush: must be a non-negative number"),
    ("memm=1M,2M", "did you mean 'mem'?"),
])
def test_axis_mistakes_name_the_axis_option(tmp_path, axis, match):
    """A bad --axis value was reported as a --run-args mistake, an option not typed."""
    outcome = invoke(["study", "plan", "--app", "fwq", "--nodes", "1", "--ranks-per-node", "1",
                      "--local", "--axis", axis, "--out", str(tmp_path / "study")])
    outcome.check()
    assert match in outcome.stderr and "--run-args" not in outcome.stderr, outcome.stderr
    assert not (tmp_path / "study").exists()


@pytest.mark.parametrize("kind", ["python", "executable"])
def test_the_apps_exit_status_is_passed_on_and_said(tmp_path, kind):
    """Exit 2 of the app is the app's, not a usage error of mckmpi: the status is kept (as
    srun and mpiexec keep a task's) and one line says whose it is."""
    app = tmp_path / ("exit.py" if kind == "python" else "exit.sh")
    app.write_text("import sys\nsys.exit(2)\n" if kind == "python" else "#!/bin/sh\nexit 2\n")
    app.chmod(0o755)
    proc = mckmpi("run", "--out", str(tmp_path), "--", str(app), timeout=60)
    assert proc.returncode == 2
    assert f"mckmpi: rank 0: {app} exited with status 2" in proc.stderr.splitlines(), proc.stderr
    assert "mckmpi: error:" not in proc.stderr and "Traceback" not in proc.stderr


def test_a_status_of_another_rank_is_said_by_that_rank(tmp_path):
    """Rank 1 alone exits 3 while rank 0 waits for it: rank 1 says so, and the job's
    status is 3 (rank 0, when it exits too, speaks first and ends the job)."""
    app = tmp_path / "one_fails.py"
    app.write_text("import sys\nfrom mpi4py import MPI\n"
                   "if MPI.COMM_WORLD.Get_rank() == 1:\n    sys.exit(3)\n"
                   "MPI.COMM_WORLD.Barrier()\n")
    proc = mpirun(2, "run", "--out", str(tmp_path), "--", str(app), timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert "mckmpi: rank 1 exited with status 3" in proc.stderr.splitlines(), proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("name,match", [
    ("MCKMPI_" + "MDOE", "did you mean 'MCKMPI_MODE'?"),
    ("MCKMPI_" + "LINUX_CORE", "did you mean 'MCKMPI_LINUX_CORES'?"),
    ("MCKMPI_" + "XYZZY", "unknown environment variable"),
    ("MCKMPI_" + "mode", "did you mean 'MCKMPI_MODE'?"),
])
def test_unknown_mckmpi_variables_are_refused(app, name, match):
    """A misspelt MCKMPI_MODE=lwk ran in linux mode without a word, unlike a typo in the
    configuration file."""
    script, marker = app
    outcome = invoke(["partition", "show"], {name: "lwk"})
    outcome.check()
    assert match in outcome.stderr and name in outcome.stderr, outcome.stderr
    line = _one_line(mckmpi("run", "--", str(script), str(marker), env=job_env(**{name: "1"})))
    assert name in line and not marker.exists()


def test_every_mckmpi_variable_the_project_names_is_accepted():
    """What the project sets for its children or reads itself (job scripts' MCKMPI_STUDY_*,
    tests' MCKMPI_TAG, benchmarks', the test cluster's) must never be refused."""
    import re

    from mckmpi import config

    root = Path(__file__).resolve().parents[1]
    listed = subprocess.run(["git", "-C", str(root), "ls-files"], capture_output=True,
                            text=True, timeout=30, check=True).stdout.split()
    names = set()
    for name in listed:
        path = root / name
        if path.suffix in (".py", ".md", ".in", ".sh", ".toml", "") and path.is_file():
            text = path.read_text(errors="replace")
            # MCKMPI_STUDY_* or MCKMPI_<NAME> in prose name a family, not a variable
            names |= {n for n in re.findall(r"MCKMPI_[A-Z0-9_]+", text) if not n.endswith("_")}
    assert len(names) > 20  # the options' variables are among them
    assert names <= config.known_variables(), names - config.known_variables()
    config.check_environment({name: "" for name in names})


@pytest.mark.parametrize("argv,match", [
    (["runs", "qurey"], "did you mean 'query'?"),
    (["reprot", "x.h5"], "did you mean 'report'?"),
    (["study", "colect", "x"], "did you mean 'collect'?"),
    (["partition", "shwo"], "did you mean 'show'?"),
    (["partition", "show", "--mode", "lwkk"], "did you mean 'lwk'?"),
    (["run", "--lnux-cores", "1", "--", "/bin/true"], "did you mean '--linux-cores'?"),
    (["study", "plan", "--app", "fwq", "--nodes", "1", "--ranks-per-node", "1", "--locl"],
     "did you mean '--local'?"),
])
def test_mistyped_commands_and_options_name_the_closest(argv, match):
    outcome = invoke(argv)
    outcome.check()
    assert match in outcome.stderr, outcome.stderr


def test_simulate_bounds_the_rank_count(tmp_path):
    """--ranks 1e30 printed a 31-digit row of predictions for a machine that cannot exist."""
    import numpy as np

    path = write_synthetic(tmp_path / "run.h5", fwq=np.arange(1000, 2000, dtype=np.int64))
    outcome = invoke(["simulate", "--from", str(path), "--ranks", "1e3,1e30", "--work-us", "100"])
    outcome.check()
    assert "--ranks: '1e30' is more than" in outcome.stderr and outcome.stdout == ""


def test_counts_agree_with_their_nouns(tmp_path):
    """'1 runs', '1 ranks': a count of one takes the singular wherever a count is printed."""
    from mckmpi.utility.table import counted

    assert [counted(n, "run") for n in (0, 1, 2)] == ["0 runs", "1 run", "2 runs"]
    assert counted(1, "quantum", "quanta") == "1 quantum" and counted(3, "x", "xs") == "3 xs"
    runs = tmp_path / "runs"
    runs.mkdir()
    write_synthetic(runs / "one.h5", app_iter=[100_000] * 5,
                    app_attrs={"name": "cg", "scaling": "strong", "global_size": 1000})
    outcome = invoke(["study", "collect", str(runs), "-o", str(tmp_path / "study.h5")])
    assert outcome.code == 0, outcome.stderr
    assert "study: 1 run (" in outcome.stdout and ": 1 run, 0 files skipped" in outcome.stdout
    assert "1 runs" not in outcome.stdout



# --- found by trying ~100 more bad inputs as a new user -----------------------------------


@pytest.mark.parametrize("extra,match", [
    (["--work-us", "nan"], "--work-us must be positive (and finite)"),
    (["--work-us", "inf"], "--work-us must be positive (and finite)"),
    (["--work-us", "1e300"], "spans more than the 1000 FWQ samples"),
    (["--work-us", "1", "--iterations", str(10**11)], "at most 1,000,000"),
    (["--work-us", "1", "--seed", "-1"], "--seed must be a whole number from 0"),  # traceback
    (["--work-us", "1", "--allreduce-round-us", "1", "--allreduces", str(10**9)],
     "at most 100"),  # once: hours of rounds
    (["--work-us", "1", "--allreduce-round-us", "inf"], "--allreduce-round-us must be positive"),
])
def test_simulate_numbers_are_bounded(tmp_path, extra, match):
    """nan and inf work gave a traceback, 10^11 iterations a 745 GiB MemoryError, 1e300 us
    a line with a 300-digit number."""
    import numpy as np

    path = write_synthetic(tmp_path / "run.h5", fwq=np.arange(1000, 2000, dtype=np.int64))
    outcome = invoke(["simulate", "--from", str(path), "--ranks", "1e3", *extra])
    outcome.check()
    assert match in outcome.stderr and len(outcome.stderr) < 300, outcome.stderr


@pytest.mark.parametrize("extra,match", [
    (["--out", "FILE"], "is a file, not a directory"),
    (["--detour-s", "inf"], "--detour-s must be more than 0"),
    (["--samples", str(10**11)], "--samples must be from 1"),
])
def test_demo_options_are_checked_before_the_runs(tmp_path, extra, match):
    """A file as --out failed with 'File exists' (status 1); inf seconds of detour ran on."""
    (tmp_path / "FILE").write_text("")
    argv = [str(tmp_path / "FILE") if a == "FILE" else a for a in extra]
    outcome = invoke(["demo", *argv])
    outcome.check()
    assert match in outcome.stderr


@pytest.mark.parametrize("extra,match", [
    (["--repeats", str(10**8)], "--repeats must be from 1 to 1000"),  # once: a hang
    (["--time", "xyz"], "is not a Slurm time limit"),  # once: found by sbatch, at submit
    (["--out", "FILE"], "is a file, not a directory"),  # once: status 1, 'FILE/jobs'
    (["--out", "FILE/study"], "is a file, not a directory"),
    (["--nodes", "1,2,3,4", "--axis", "mem=" + ",".join(f"{m}M" for m in range(1, 17)),
      "--axis", "app:--samples=" + ",".join(map(str, range(1, 11)))], "more than 1000"),
])
def test_study_plan_bounds_and_paths(tmp_path, extra, match):
    (tmp_path / "FILE").write_text("")
    argv = [a.replace("FILE", str(tmp_path / "FILE")) for a in extra]
    base = ["study", "plan", "--app", "fwq", "--ranks-per-node", "1", "--local"]
    if "--nodes" not in argv:
        base += ["--nodes", "1"]
    if "--out" not in argv:
        base += ["--out", str(tmp_path / "study")]
    outcome = invoke([*base, *argv])
    outcome.check()
    assert match in outcome.stderr, outcome.stderr
    assert not (tmp_path / "study").exists()


@pytest.mark.parametrize("extra,match", [
    (["--cpus", "abc"], "--cpus: not a CPU list"),  # once: a ValueError traceback
    (["--cpus", "4096"], "is not among this process's CPUs"),
    (["--expect", "0"], "--expect must be at least 1"),
    (["--idle-timeout", "nan"], "--idle-timeout must be a positive number"),
    (["--spin-us", "-1"], "--spin-us must be a number of microseconds from 0"),
])
def test_proxy_options_are_checked_before_it_starts(tmp_path, extra, match):
    socket_dir = tmp_path / "proxy"
    outcome = invoke(["proxy", "--socket", str(socket_dir / "p.sock"), *extra])
    outcome.check()
    assert match in outcome.stderr
    assert not socket_dir.exists()


def test_run_args_name_the_closest_run_option(tmp_path):
    outcome = invoke(["study", "plan", "--app", "fwq", "--nodes", "1", "--ranks-per-node", "1",
                      "--local", "--run-args", "--memm 1M", "--out", str(tmp_path / "s")])
    outcome.check()
    assert "did you mean '--mem'?" in outcome.stderr


def test_partition_errors_count_in_agreement():
    """'1 ranks', '1 LWK cores' in the partition's refusals."""
    outcome = invoke(["partition", "show", "--mode", "lwk", "--ranks", "1", "--mem", "1000T"])
    outcome.check()
    assert "x 1 rank =" in outcome.stderr, outcome.stderr
    outcome = invoke(["partition", "show", "--mode", "lwk", "--ranks", "5", "--lwk-cores",
                      "1-1", "--linux-cores", "0-0"])
    outcome.check()
    assert "5 ranks need 5 cores but the node has 1 LWK core " in outcome.stderr, outcome.stderr


def test_an_empty_out_is_refused(app):
    """--out "$UNSET" wrote the run file into the working directory without a word."""
    script, marker = app
    line = _one_line(mckmpi("run", "--out", "", "--", str(script), str(marker)))
    assert "--out: an empty path" in line and not marker.exists()


def test_config_that_is_a_device_is_named_so():
    outcome = invoke(["partition", "show"], {"MCKMPI_CONFIG": "/dev/zero"})
    outcome.check()
    assert "not a regular file" in outcome.stderr and "missing" not in outcome.stderr
