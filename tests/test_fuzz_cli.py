"""Every bad input ends with one clear line: a fuzzer of the CLI, the configuration and the
run-file readers.

Hypothesis generates bad option values (on the command line, in MCKMPI_* variables, in a
TOML file), bad configuration files and crafted run files, and every outcome is held to the
same rule: a non-zero exit status for a bad input, no "Traceback", at most 3 lines on
stderr, at most 5 s and 500 MiB. Commands run in this process where that is safe (fast:
hundreds of cases a second); what could crash or exhaust the interpreter (byte-level
damage to an HDF5 file, CPU lists that once expanded into gigabytes) runs as a subprocess
under resource limits.

The default profile keeps the suite fast; ``MCKMPI_FUZZ_PROFILE=soak`` runs many more
examples (``MCKMPI_FUZZ_PROFILE=soak python -m pytest tests/test_fuzz_cli.py``).
"""

from __future__ import annotations

import io
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fixtures import job_env
from mckmpi import config
from mckmpi.frontend import cli
from test_analysis import DETOUR_DTYPE, offload_calls, write_synthetic

settings.register_profile(
    "bounded", max_examples=25, deadline=None, database=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "soak", max_examples=1000, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
PROFILE = os.environ.get("MCKMPI_FUZZ_PROFILE", "bounded")
FUZZ = settings.get_profile(PROFILE)
#: Subprocess cases cost ~0.5 s each: fewer of them.
FUZZ_SUBPROCESS = settings(FUZZ, max_examples=max(4, FUZZ.max_examples // 5))

MAX_SECONDS = 5.0
MAX_RSS = 500 * 1024**2
MAX_LINES = 3
#: Address-space limit of fuzzed subprocesses: a regression that expands a list into
#: gigabytes fails fast instead of taking the machine with it.
SUBPROCESS_AS_LIMIT = 2 * 1024**3
#: Address space an in-process command may add: past it, allocations fail in the command.
IN_PROCESS_AS_MARGIN = 1024**3


@dataclass
class Outcome:
    argv: list[str]
    code: int
    stdout: str
    stderr: str
    seconds: float
    rss_growth: int

    def check(self, must_fail: bool = True) -> None:
        """The rule: one clear line for a failure, no traceback, bounded time and memory."""
        what = f"mckmpi {' '.join(self.argv)!r}"
        assert "Traceback" not in self.stderr + self.stdout, f"{what}:\n{self.stderr}"
        assert self.seconds < MAX_SECONDS, f"{what} took {self.seconds:.1f} s"
        assert self.rss_growth < MAX_RSS, f"{what} grew by {self.rss_growth >> 20} MiB"
        if must_fail:
            assert self.code != 0, f"{what} succeeded:\n{self.stdout[:500]}"
        if self.code != 0:
            lines = self.stderr.splitlines()
            assert 1 <= len(lines) <= MAX_LINES, f"{what}: {len(lines)} lines:\n{self.stderr}"
            assert any(line.startswith("mckmpi: error: ") for line in lines), f"{what}:\n{self.stderr}"


def _vm_size() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def invoke(argv: list[str], env: dict[str, str] | None = None) -> Outcome:
    """`mckmpi ARGV` in this process, with MCKMPI_* taken from `env` only."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MCKMPI_")}
    clean.update(env or {})
    out, err = io.StringIO(), io.StringIO()
    rss_before, peak_before = _rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    saved = resource.getrlimit(resource.RLIMIT_AS)
    start = time.monotonic()
    with mock.patch.dict(os.environ, clean, clear=True), redirect_stdout(out), redirect_stderr(err):
        # A command that tries to take gigabytes gets a MemoryError (reported below), not
        # the kernel's OOM killer aimed at the test session.
        resource.setrlimit(resource.RLIMIT_AS, (_vm_size() + IN_PROCESS_AS_MARGIN, saved[1]))
        try:
            code = cli.main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - what the user would see, as the test's message
            traceback.print_exc(file=err)
            code = 1
        finally:
            resource.setrlimit(resource.RLIMIT_AS, saved)
    seconds = time.monotonic() - start
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    growth = (peak_after * 1024 - rss_before) if peak_after > peak_before else 0
    return Outcome(argv, code, out.getvalue(), err.getvalue(), seconds, growth)


def invoke_subprocess(argv: list[str], env: dict[str, str] | None = None,
                      timeout: float = 30) -> Outcome:
    """`mckmpi ARGV` as a child under an address-space limit; its own peak RSS (wait4)."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (SUBPROCESS_AS_LIMIT, SUBPROCESS_AS_LIMIT))

    start = time.monotonic()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "mckmpi", *argv], stdout=out, stderr=err,
                                env=job_env(**(env or {})), preexec_fn=limit)
        deadline = start + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.monotonic() - start
        out.seek(0)
        err.seek(0)
        # Interpreter start-up and imports are not the command's time.
        return Outcome(argv, proc.returncode, out.read(), err.read(), seconds - _startup(),
                       usage.ru_maxrss * 1024)


_STARTUP: list[float] = []


def _startup() -> float:
    """Seconds a child needs to start Python and import mckmpi's CLI (measured once)."""
    if not _STARTUP:
        t = time.monotonic()
        subprocess.run([sys.executable, "-m", "mckmpi", "--version"], capture_output=True,
                       timeout=60, check=True)
        _STARTUP.append(time.monotonic() - t)
    return _STARTUP[0]


# --- bad values per option ------------------------------------------------------------------

_junk = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                min_size=1, max_size=30)


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _huge_cpulist() -> st.SearchStrategy[str]:
    big = st.integers(min_value=10**4, max_value=10**40).map(str)
    return st.one_of(
        big.map(lambda b: f"0-{b}"),
        st.tuples(big, big).map(lambda t: f"{t[0]},{t[1]}"),
        st.integers(1, 60).map(lambda n: "0-" + "9" * n),
        st.integers(10, 5000).map(lambda n: "1-" + "9" * n),
    )


def _bad_cpulist() -> st.SearchStrategy[str]:
    return st.one_of(_huge_cpulist(), _junk.filter(lambda t: not set(t) <= set("0123456789-, ")),
                     st.sampled_from(["3-1", "-1", "1--2", "0-", "a-b", "1,,x"]))


def _not_a_whole_number(text: str) -> bool:
    try:
        return int(text) < 1
    except ValueError:
        return True


BAD_VALUES: dict[str, st.SearchStrategy[str]] = {
    "switch_interval": _junk.filter(lambda t: not _is_float(t)),
    "linux_cores": st.one_of(_huge_cpulist(), st.sampled_from(["3-1", "x", "1-a", "--1", "0-"])),
    "lwk_cores": _bad_cpulist(),
    "mem": st.one_of(_junk.filter(lambda t: not t.strip()[:1].isdigit()),
                     st.sampled_from(["0", "0M", "-5G", "1X", "12QB"])),
    "vnodes": _junk.filter(_not_a_whole_number),
    "oversubscribe": _junk.filter(
        lambda t: t.strip().lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off", "")),
    "out": st.text(" \t", max_size=3),  # "$UNSET" in a job script
}
for _opt in config.options("partition", "lwk", "offload", "run"):
    if _opt.choices is not None:
        BAD_VALUES[_opt.name] = _junk.filter(lambda t, c=_opt.choices: t not in c)
FUZZED = sorted(BAD_VALUES)


def _origin(opt: config.Option, where: str, path: Path) -> str:
    return {"cli": opt.cli_flags[0], "env": opt.env, "file": str(path)}[where]


def _toml_string(text: str) -> str:
    return '"' + "".join(c if c.isprintable() and c not in '"\\' else f"\\u{ord(c):04x}"
                         for c in text) + '"'


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module", autouse=True)
def warm(workdir) -> None:
    """The first call of a command pays for its imports: not part of what is measured."""
    base = _base_run(workdir)
    invoke(["report", str(base)])
    invoke(["partition", "show"])


@settings(FUZZ)
@given(name=st.sampled_from(FUZZED), data=st.data(),
       where=st.sampled_from(["cli", "env", "file"]), command=st.sampled_from(["run", "partition"]))
def test_bad_option_values(workdir, name, data, where, command):
    """A bad value of any option, from any origin, is one line naming where it came from."""
    opt = next(o for o in config.options("partition", "lwk", "offload", "run") if o.name == name)
    if command == "partition":
        assume(opt.section == "partition")
    value = data.draw(BAD_VALUES[name])
    path = workdir / "fuzz.toml"
    argv, env = [], {"MCKMPI_CONFIG": str(path)}
    path.write_text("")
    if where == "cli":
        argv = [f"{opt.cli_flags[0]}={value}"]
    elif where == "env":
        assume("\x00" not in value)
        env[opt.env] = value
    else:
        path.write_text(f"[{opt.section}]\n{opt.name} = {_toml_string(value)}\n", encoding="utf-8")
    if command == "run":
        full = ["run", *argv, "--", str(workdir / "never-run.py")]
    else:
        # lwk mode reads every partition option (a --mode on the command line would
        # override a fuzzed MCKMPI_MODE or file value)
        full = ["partition", "show", *(["--mode", "lwk"] if name != "mode" else []), *argv]
    outcome = invoke(full, env)
    outcome.check()
    assert _origin(opt, where, path) in outcome.stderr, outcome.stderr


@settings(FUZZ)
@given(command=st.sampled_from([["partition", "show"], ["partition", "status"], ["report"],
                                ["compare"], ["simulate"], ["study", "collect"], ["study", "plot"],
                                ["run"], ["info"], ["bench"], ["study"], []]),
       tokens=st.lists(st.one_of(_junk, st.sampled_from(
           ["--json", "--plots", "--ranks", "--from", "--work-us", "-o", "--mode", "--", "-m",
            "--vnodes", "--iterations", "--source", "--seed", "nan", "-1", "1e400", "--help"])),
           max_size=6))
def test_random_arguments(workdir, command, tokens):
    """Any command line: parsed or refused in one line; never a traceback."""
    if command[:1] == ["run"]:
        tokens = [t for t in tokens if t not in ("--", "-m")] + ["--", str(workdir / "never.py")]
    if command in (["bench"], ["info"]) and "--help" not in tokens:
        tokens = [*tokens, "--no-such-option"]  # never start a benchmark
    outcome = invoke([*command, *tokens])
    outcome.check(must_fail=False)


@settings(FUZZ)
@given(value=st.one_of(st.integers(0, 10**30), st.floats(allow_nan=True), st.text(max_size=20)),
       ranks=st.one_of(st.none(), st.integers(-5, 10**12), st.just(10**8)),
       vnodes=st.one_of(st.just(1), st.integers(-3, 10**9)))
def test_partition_show_sizes(value, ranks, vnodes):
    """Sizes and counts that parse but cannot be planned: refused in bounded time and memory."""
    argv = ["partition", "show", "--mode", "lwk", "--oversubscribe", "--vnodes", str(vnodes),
            "--linux-cores", str(value)]
    if ranks is not None:
        argv += ["--ranks", str(ranks)]
    invoke(argv).check(must_fail=False)


# --- configuration files --------------------------------------------------------------------

_toml_value = st.one_of(st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=False),
                        st.booleans(), _junk.map(_toml_string),
                        st.lists(st.integers(0, 9), max_size=3).map(str),
                        st.just('{ a = 1 }'))


@settings(FUZZ)
@given(section=st.one_of(st.sampled_from(["partition", "lwk", "offload", "run"]), st.from_regex(
           r"[a-z_]{1,10}", fullmatch=True)),
       key=st.one_of(st.sampled_from([o.name for o in config.options("partition", "lwk",
                                                                      "offload", "run")]),
                     st.from_regex(r"[a-z_]{1,12}", fullmatch=True)),
       value=_toml_value)
def test_config_tables(workdir, section, key, value):
    """A file with any section, key and value: accepted, or one line naming the file."""
    path = workdir / "table.toml"
    path.write_text(f"[{section}]\n{key} = {value}\n")
    outcome = invoke(["partition", "show", "--mode", "lwk", "--oversubscribe"],
                     {"MCKMPI_CONFIG": str(path)})
    known = {o.name: o for o in config.options("partition", "lwk", "offload", "run")}
    must_fail = key not in known or known[key].section != section
    outcome.check(must_fail=must_fail)
    if outcome.code:
        assert str(path) in outcome.stderr


@settings(FUZZ)
@given(content=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode),
                         st.sampled_from([b"3", b"x = 1", b"[partition]\n[partition]\n",
                                          b"\xff\xfe[partition]", b"partition = [1, 2]",
                                          b"[[partition]]\nmem = 1"])))
def test_config_bytes(workdir, content):
    """Any bytes as the configuration file: read, or refused in one line."""
    path = workdir / "bytes.toml"
    path.write_bytes(content)
    invoke(["partition", "show"], {"MCKMPI_CONFIG": str(path)}).check(must_fail=False)


def test_config_unreadable_or_not_a_file(workdir):
    d = workdir / "cfgdir"
    d.mkdir(exist_ok=True)
    invoke(["partition", "show"], {"MCKMPI_CONFIG": str(d)}).check()
    fifo_free = workdir / "noperm.toml"
    fifo_free.write_text("[partition]\n")
    fifo_free.chmod(0)
    try:
        if os.geteuid() != 0:
            invoke(["partition", "show"], {"MCKMPI_CONFIG": str(fifo_free)}).check()
    finally:
        fifo_free.chmod(0o600)


# --- run files ------------------------------------------------------------------------------

_BASE: list[Path] = []


def _base_run(workdir: Path) -> Path:
    """A complete run file with every concern the readers know (FWQ, detours, offload calls,
    app figures), written through the real writer."""
    if not _BASE:
        detours = np.zeros(3, dtype=DETOUR_DTYPE)
        detours["start_ns"] = [0, 10_000, 20_000]
        detours["duration_ns"] = [1000, 2000, 3000]
        _BASE.append(write_synthetic(
            workdir / "base.h5", fwq=1_000_000 + np.arange(200, dtype=np.int64),
            noise_attrs={"fwq_quantum_ns": 1_000_000}, detours=detours, span_ns=10**9,
            calls=offload_calls(), app_iter=[100_000] * 5,
            app_attrs={"name": "cg", "scaling": "strong", "global_size": 1000, "verified": True}))
    return _BASE[0]


_attr_value = st.one_of(
    st.integers(-2**63, 2**63 - 1), st.floats(), st.booleans(),
    st.text(max_size=20).filter(lambda t: "\0" not in t),  # HDF5 strings end at NUL
    st.binary(max_size=20).filter(lambda b: b"\0" not in b), st.just(np.zeros(0)), st.just(np.arange(6).reshape(2, 3)),
    st.just(np.array([b"a", b"b"])), st.just(np.array([1.5, np.nan])),
    st.just(np.zeros(2, dtype=[("x", "i4"), ("y", "f8")])), st.just(np.uint64(2**64 - 1)),
    st.just(np.complex128(1 + 2j)), st.just(np.array([True, False])),
)
_ATTR_PLACES = ["/", "provenance", "noise", "app", "noise/fwq_ns", "offload/calls", "ranks"]
_ATTR_NAMES = ["schema", "schema_version", "complete", "world_size", "nnodes", "mode", "app",
               "app_args", "created", "command", "fwq_quantum_ns", "global_size", "scaling",
               "verified", "name", "units", "kind", "units:start_ns", "hosts", "vnodes"]


def _replacement(kind: str) -> np.ndarray:
    return {
        "float": np.linspace(0, 1, 10),
        "strings": np.array([b"x", b"y"]),
        "3d": np.zeros((1, 2, 3), dtype=np.int64),
        "empty": np.zeros((0,), dtype=np.int64),
        "scalar": np.int64(7),
        "no-rank-column": np.zeros(3, dtype=[("a", "i4")]),
        "negative": -np.ones((1, 50), dtype=np.int64),
        "huge-rank": np.array([(2**31 - 1, 1, 1)], dtype=[("rank", "i4"), ("start_ns", "i8"),
                                                          ("duration_ns", "i8")]),
    }[kind]


@settings(FUZZ)
@given(place=st.sampled_from(_ATTR_PLACES), name=st.sampled_from(_ATTR_NAMES), value=_attr_value,
       command=st.sampled_from(["report", "json", "compare", "simulate", "collect"]))
def test_crafted_attributes(workdir, place, name, value, command):
    """An attribute of any type in any place: read, or refused in one line."""
    path = workdir / "crafted" / "run.h5"
    path.parent.mkdir(exist_ok=True)
    shutil.copy(_base_run(workdir), path)
    with h5py.File(path, "a") as f:
        f[place].attrs[name] = value
    _post_process(workdir, path, command).check(must_fail=False)


@settings(FUZZ)
@given(target=st.sampled_from(["noise/fwq_ns", "noise/detours", "offload/calls", "ranks",
                               "app/iter_ns", "app/wall_ns", "noise/detour_span_ns", "noise",
                               "provenance", "app"]),
       kind=st.sampled_from(["delete", "float", "strings", "3d", "empty", "scalar",
                             "no-rank-column", "negative", "huge-rank"]),
       command=st.sampled_from(["report", "json", "compare", "simulate", "collect"]))
def test_crafted_datasets(workdir, target, kind, command):
    """A dataset missing or of the wrong shape or type: read, or refused in one line."""
    path = workdir / "crafted-ds" / "run.h5"
    path.parent.mkdir(exist_ok=True)
    shutil.copy(_base_run(workdir), path)
    with h5py.File(path, "a") as f:
        if target in f:
            del f[target]
        if kind != "delete":
            f.create_dataset(target, data=_replacement(kind))
    _post_process(workdir, path, command).check(must_fail=False)


def _post_process(workdir: Path, path: Path, command: str) -> Outcome:
    base = _base_run(workdir)
    argv = {
        "report": ["report", str(path)],
        "json": ["report", str(path), "--json"],
        "compare": ["compare", str(base), str(path)],
        "simulate": ["simulate", "--from", str(path), "--ranks", "1e3", "--work-us", "100",
                     "--iterations", "50"],
        "collect": ["study", "collect", str(path.parent), "-o", str(workdir / "study.h5")],
    }[command]
    return invoke(argv)


@settings(FUZZ_SUBPROCESS)
@given(cut=st.floats(0.0, 1.0), flips=st.lists(st.tuples(st.floats(0.0, 1.0),
                                                         st.integers(0, 255)), max_size=8),
       command=st.sampled_from(["report", "simulate"]))
def test_damaged_bytes(workdir, cut, flips, command):
    """A truncated or bit-flipped file (in a child: the HDF5 library may not survive it)."""
    data = bytearray(_base_run(workdir).read_bytes())
    for where, byte in flips:
        data[int(where * (len(data) - 1))] = byte
    data = data[:max(1, int(cut * len(data)))] if cut < 1.0 else data
    path = workdir / "damaged.h5"
    path.write_bytes(bytes(data))
    argv = (["report", str(path)] if command == "report" else
            ["simulate", "--from", str(path), "--ranks", "1e3", "--work-us", "100",
             "--iterations", "50"])
    outcome = invoke_subprocess(argv)
    assert outcome.code >= 0 or outcome.code == -signal.SIGPIPE, (
        f"killed by signal {-outcome.code}: {outcome.stderr[-500:]}")
    outcome.check(must_fail=False)


@settings(FUZZ_SUBPROCESS)
@given(value=_huge_cpulist(), option=st.sampled_from(["--linux-cores", "--lwk-cores"]),
       via=st.sampled_from(["cli", "env"]))
def test_huge_cpu_lists_in_a_child(value, option, via):
    """CPU lists that would expand into gigabytes: refused at once, in a child whose address
    space is limited (the finding: 8 GB of RSS per rank in 24 s)."""
    env = {}
    argv = ["partition", "show", "--mode", "lwk"]
    if via == "cli":
        argv += [option, value]
    else:
        env["MCKMPI_" + option[2:].replace("-", "_").upper()] = value
    invoke_subprocess(argv, env).check()


# --- the launcher's environment -------------------------------------------------------------

_LAUNCHER_VARS = [
    "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
    "OMPI_COMM_WORLD_LOCAL_SIZE", "PMI_RANK", "PMI_SIZE", "PMI_FD", "MPI_LOCALRANKID",
    "MPI_LOCALNRANKS", "SLURM_STEP_ID", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID",
    "SLURM_NODEID", "SLURM_STEP_NUM_NODES", "SLURM_STEP_TASKS_PER_NODE", "PMIX_RANK",
]


@settings(FUZZ)
@given(env=st.dictionaries(st.sampled_from(_LAUNCHER_VARS), st.one_of(
    st.integers(-3, 10**12).map(str), _junk, st.sampled_from(["2(x3),1", "1(x99999999999)"])),
    max_size=len(_LAUNCHER_VARS)))
def test_launcher_environment(env):
    """Whatever the launcher's variables hold: a placement, or one PlacementError."""
    from mckmpi.errors import PlacementError
    from mckmpi.node.placement import from_env

    try:
        p = from_env(env, host="h")
    except PlacementError as exc:
        assert "\n" not in str(exc)
    else:
        assert 0 <= p.rank < p.size and 0 <= p.local_rank < p.local_size


@settings(FUZZ)
@given(suffix=st.text(st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcxyz019"), max_size=24),
       command=st.sampled_from([["partition", "show"], ["run", "--", "/bin/true"]]))
def test_unknown_mckmpi_variables(suffix, command):
    """Any MCKMPI_* name that is not mckmpi's is refused in one line naming it, before
    anything runs; the known ones never are."""
    name = "MCKMPI_" + suffix
    assume(name not in config.known_variables())
    outcome = invoke(command, {name: "1"})
    outcome.check()
    assert f"unknown environment variable {name}" in outcome.stderr
    config.check_environment({known: "" for known in config.known_variables()})
