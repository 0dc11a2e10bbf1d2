"""Options: one declaration each, readable from the command line, the environment and a file.

Every option is declared once here with its type, default and help. The CLI builds its
argument groups from these declarations, and `resolve` gives each option its value by the
precedence users of HPC tools expect: command line > environment (``MCKMPI_<NAME>``) >
configuration file > default. The file is TOML, one table per section::

    # mckmpi.toml (or the file named by MCKMPI_CONFIG, or ~/.config/mckmpi/config.toml)
    [partition]
    linux_cores = "1"
    mem = "512M"
    [run]
    out = "results"

Environment variables are how ``mpiexec``/``srun`` hand the same settings to every rank.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mckmpi.errors import UsageError, did_you_mean


@dataclass(frozen=True)
class Option:
    """One setting: its CLI flags, its environment variable and its file key derive from `name`."""

    name: str
    section: str
    help: str
    default: Any = None
    type: Callable[[str], Any] = str
    flags: tuple[str, ...] = ()
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    flag: bool = False  # a switch without a value (store_true)

    @property
    def env(self) -> str:
        return "MCKMPI_" + self.name.upper()

    @property
    def cli_flags(self) -> tuple[str, ...]:
        return self.flags or ("--" + self.name.replace("_", "-"),)

    def convert(self, raw: Any, origin: str) -> Any:
        """Turn a string (or a TOML value) into the option's type; a bad value is one
        `UsageError` naming where it came from (flag, variable or file and section)."""
        if self.flag:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off", ""):
                return False
            raise UsageError(f"{origin}: expected a boolean for {self.name}, got {_shown(raw)}")
        if isinstance(raw, (dict, list)) or (isinstance(raw, bool) and self.type is not str):
            raise UsageError(f"{origin}: {self.name} takes a {self.metavar or 'value'}, "
                             f"got {type(raw).__name__} {_shown(raw)}")
        try:
            value = self.type(raw if isinstance(raw, str) else str(raw))
        except UsageError as exc:
            raise UsageError(f"{origin}: {exc}") from None
        except (ValueError, TypeError, OverflowError):
            raise UsageError(f"{origin}: invalid {self.name} {_shown(raw)}"
                             + (f" (expected {self.metavar})" if self.metavar else "")) from None
        if self.choices is not None and value not in self.choices:
            raise UsageError(
                f"{origin}: invalid {self.name} {_shown(raw)} (choose from {', '.join(self.choices)})"
            )
        return value


def _shown(raw: Any, limit: int = 60) -> str:
    """A value as the user typed it, cut short: error lines stay one readable line."""
    text = repr(raw)
    return text if len(text) <= limit else text[:limit - 4] + "...'"


@dataclass
class Settings:
    """Resolved option values, with the origin of each for provenance and error messages."""

    values: dict[str, Any] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None

    def blame(self, message: str) -> str:
        """`message` (which names options by their flags, as the planners do) with where
        each named value came from when that was not the command line: a plan that
        refuses ``--linux-cores 5`` set in a TOML file says which file."""
        notes = [f"{opt.cli_flags[0]} from {self.origins[name]}"
                 for name, opt in _REGISTRY.items()
                 if self.origins.get(name, "command line") not in ("command line", "default")
                 and opt.cli_flags[0] in message]
        return message + (f" ({'; '.join(notes)})" if notes else "")


_REGISTRY: dict[str, Option] = {}


def option(**kwargs: Any) -> Option:
    """Declare an option; names are unique across sections (one env var per name)."""
    opt = Option(**kwargs)
    if opt.name in _REGISTRY:
        raise ValueError(f"option {opt.name} declared twice")
    _REGISTRY[opt.name] = opt
    return opt


def options(*sections: str) -> list[Option]:
    """The declared options of the given sections, in declaration order."""
    return [o for o in _REGISTRY.values() if o.section in sections]


def to_argv(values: Mapping[str, Any]) -> list[str]:
    """Option values (name -> value, as `resolve` or `Option.convert` gives them) as the
    command-line flags that set them again: how a launcher hands typed options to `mckmpi run`."""
    from mckmpi.utility.units import format_cpulist

    argv: list[str] = []
    for name, value in values.items():
        opt = _REGISTRY.get(name)
        if opt is None:
            raise UsageError(f"unknown option {name!r}")
        if value is None or (opt.flag and not value):
            continue
        argv.append(opt.cli_flags[0])
        if opt.flag:
            continue
        if isinstance(value, tuple):  # a CPU list
            text = format_cpulist(value)
            argv.append(f"{text}-{text}" if text.isdigit() else text)
        else:
            argv.append(str(value))
    return argv


def add_arguments(parser: argparse.ArgumentParser, *sections: str) -> None:
    """One argument group per section; defaults are left out so `resolve` can layer them."""
    for section in sections:
        group = parser.add_argument_group(f"{section} options")
        for opt in options(section):
            shown = "on" if opt.flag and opt.default else opt.default
            helptext = f"{opt.help} [env {opt.env}; default {shown}]"
            if opt.flag:
                group.add_argument(
                    *opt.cli_flags, dest=opt.name, action="store_const", const=True,
                    default=argparse.SUPPRESS, help=helptext,
                )
            else:
                group.add_argument(
                    *opt.cli_flags, dest=opt.name, default=argparse.SUPPRESS,
                    metavar=opt.metavar, choices=opt.choices, help=helptext,
                )


def config_file(env: Mapping[str, str] = os.environ) -> Path | None:
    """The configuration file in effect: MCKMPI_CONFIG, ./mckmpi.toml, ~/.config/mckmpi/config.toml."""
    if env.get("MCKMPI_CONFIG"):
        path = Path(env["MCKMPI_CONFIG"])
        if path.is_dir():
            raise UsageError(f"MCKMPI_CONFIG names a directory, not a TOML file: {path}")
        if path.exists() and not path.is_file():
            raise UsageError(f"MCKMPI_CONFIG names {path}, which is not a regular file "
                             "(unset MCKMPI_CONFIG to use no file)")
        if not path.is_file():
            raise UsageError(f"MCKMPI_CONFIG names a missing file: {path}")
        return path
    for path in (Path("mckmpi.toml"), Path.home() / ".config" / "mckmpi" / "config.toml"):
        if path.is_file():
            return path
    return None


def read_file(path: Path | None) -> dict[str, dict[str, Any]]:
    """The file's tables, checked: readable UTF-8 TOML whose sections and keys are declared
    options (a typo such as ``[ofload]`` would otherwise silently do nothing)."""
    if path is None:
        return {}
    try:
        with open(path, "rb") as fh:
            table = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text (byte {exc.start}): not a TOML file") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the configuration file: "
                         f"{exc.strerror or exc}") from None
    sections = {o.section for o in _REGISTRY.values()}
    for section, values in table.items():
        if section not in sections:
            raise UsageError(f"{path}: unknown section [{section}]{did_you_mean(section, sections)}"
                             f" (sections: {', '.join(sorted(sections))})")
        if not isinstance(values, dict):
            raise UsageError(f"{path}: {section} must be a table ([{section}] with keys under it), "
                             f"got {type(values).__name__}")
        keys = {o.name for o in options(section)}
        for key in values:
            if key not in keys:
                elsewhere = [o.section for o in _REGISTRY.values() if o.name == key]
                hint = (f": {key} belongs in [{elsewhere[0]}]" if elsewhere
                        else did_you_mean(key, keys))
                raise UsageError(f"{path}: unknown key {key!r} in [{section}]{hint}")
    return table


def resolve(
    args: argparse.Namespace | None,
    *sections: str,
    env: Mapping[str, str] = os.environ,
    file: Path | None = None,
) -> Settings:
    """Values of the sections' options: CLI > environment > file > default."""
    check_environment(env)
    path = file if file is not None else config_file(env)
    table = read_file(path)
    settings = Settings()
    given = vars(args) if args is not None else {}
    for opt in options(*sections):
        if opt.name in given:
            where, origin, raw = opt.cli_flags[0], "command line", given[opt.name]
        elif opt.env in env:
            where = origin = opt.env
            raw = env[opt.env]
        elif opt.name in table.get(opt.section, {}):
            origin = f"{path} [{opt.section}]"
            where = f"{origin} {opt.name}"
            raw = table[opt.section][opt.name]
        else:
            settings.values[opt.name] = opt.default
            settings.origins[opt.name] = "default"
            continue
        settings.values[opt.name] = opt.convert(raw, where)
        settings.origins[opt.name] = origin
    return settings


#: The MCKMPI_* variables that are not options: read by mckmpi or its tools, or handed by
#: them to their children. Every other MCKMPI_* name is a typo to refuse (like an unknown
#: key of the configuration file), not a setting to ignore silently.
OTHER_VARIABLES = {
    "MCKMPI_CONFIG": "the configuration file",
    "MCKMPI_STUDY_POINT": "a study job's point (set by the job script, recorded as provenance)",
    "MCKMPI_STUDY_REPEAT": "a study job's repeat (set by the job script)",
    "MCKMPI_STUDY_AXES": "a study job's axis values (set by the job script)",
    "MCKMPI_NOTIF_FLOOR_SRC": "mckmpi bench offload: where notif-floor.c is",
    "MCKMPI_SLURM_DIR": "the Slurm test cluster's directory (launch/slurm/env.in)",
    "MCKMPI_FUZZ_PROFILE": "the test suite's fuzzing profile",
    "MCKMPI_SOAK_OPS": "the soak test's operation count",
    "MCKMPI_SOAK_RECORD": "where the soak test records its numbers",
    "MCKMPI_VENV": "launch/setup: where the virtual environment goes",
    "MCKMPI_PYTHON": "launch/setup: the interpreter that builds it",
    "MCKMPI_ABORT_RECORD": "where an MPI executable's MPI_Abort records its errorcode (set by "
                           "mckmpi run for the program only, see mckmpi/_abortrecord.c)",
}


def known_variables() -> set[str]:
    """Every MCKMPI_* name mckmpi accepts: the options' and `OTHER_VARIABLES`."""
    return {o.env for o in _REGISTRY.values()} | set(OTHER_VARIABLES)


def check_environment(env: Mapping[str, str] = os.environ) -> None:
    """Refuse an MCKMPI_* variable nothing reads (a misspelt MCKMPI_MODE=lwk would run in
    linux mode without a word), naming the closest known one."""
    known = known_variables()
    unknown = sorted(name for name in env if name.startswith("MCKMPI_") and name not in known)
    if unknown:
        hint = did_you_mean(unknown[0].upper(), known, "MCKMPI_")
        raise UsageError(f"unknown environment variable {unknown[0]}{hint} (options are read "
                         f"from MCKMPI_<OPTION>, e.g. MCKMPI_LINUX_CORES; see `mckmpi run --help`)")


def to_env(settings: Settings) -> dict[str, str]:
    """The settings as MCKMPI_* variables, so a launcher can hand them to every rank."""
    out = {}
    for name, value in settings.values.items():
        if value is None:
            continue
        opt = _REGISTRY[name]
        out[opt.env] = ("1" if value else "0") if opt.flag else str(value)
    return out


#: The sections of `mckmpi run`: every place that accepts run options reads them from here.
RUN_SECTIONS = ("partition", "lwk", "offload", "run")


# --- declarations -------------------------------------------------------------------------
# Declared here, in one place, so that `mckmpi <cmd> --help`, the environment and the
# configuration file always agree on names, types and defaults.


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise UsageError(f"must be at least 1: {text!r}")
    return value


def _seconds(text: str, allow_zero: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"not a number of seconds: {_shown(text)}") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise UsageError(f"must be a {'non-negative' if allow_zero else 'positive'} number "
                         f"of seconds: {_shown(text)}")
    return value


def _positive_seconds(text: str) -> float:
    return _seconds(text, allow_zero=False)


def _nonnegative_seconds(text: str) -> float:
    return _seconds(text, allow_zero=True)


def _tag(text: str) -> str:
    """Letters, digits, '.', '_' and '-' only: it becomes part of a directory name."""
    if not re.fullmatch(r"[A-Za-z0-9._-]{0,64}", text) or text.startswith((".", "-")):
        raise UsageError(f"a tag is up to 64 letters, digits, '.', '_' or '-', not starting "
                         f"with '.' or '-': {_shown(text)}")
    return text


def _path(text: str) -> str:
    """A path that is not empty: an empty value is an unset variable in a job script
    (--out "$OUT"), not a wish to write into the working directory."""
    if not text.strip():
        raise UsageError("an empty path (an unset variable?): name a directory or a .h5 file")
    return text


def _size(text: str) -> int:
    from mckmpi.utility.units import parse_size

    return parse_size(text)


def _cpulist(text: str) -> tuple[int, ...]:
    """A CPU list, bounded before any range is expanded. Not by this host's CPUs: a study
    planned on a login node names the CPUs of the compute nodes; the partition plan checks
    the list against the CPUs of the node it runs on, before MPI starts."""
    from mckmpi.utility.units import parse_cpulist

    return parse_cpulist(text)


def _cores(text: str) -> str:
    """A count of cores or a CPU list, checked now (the plan reads it later, per node)."""
    if not re.fullmatch(r"[0-9]+", text.strip()):
        _cpulist(text)
    return text


MODE = option(
    name="mode", section="partition", default="linux", choices=("linux", "lwk"),
    help="linux: the baseline, ranks on every core with default Linux/Python behaviour; "
         "lwk: ranks on LWK cores with arena memory and the cooperative scheduler",
)
LINUX_CORES = option(
    name="linux_cores", section="partition", default="1", type=_cores, metavar="N|LIST",
    help="service cores per node kept for Linux and the proxy: a count (2) or a CPU list "
         "(0,4; a single CPU as 3-3)",
)
LWK_CORES = option(
    name="lwk_cores", section="partition", type=_cpulist, metavar="LIST",
    help="CPU list for the LWK side (default: every allowed CPU that is not a Linux core)",
)
MEM = option(
    name="mem", section="partition", default=256 * 1024**2, type=_size, metavar="SIZE",
    help="arena memory per rank in lwk mode (512M, 2G)",
)
OVERSUBSCRIBE = option(
    name="oversubscribe", section="partition", default=False, flag=True,
    help="allow more ranks than cores: ranks then share cores round-robin",
)
VNODES = option(
    name="vnodes", section="partition", default=1, type=_positive_int, metavar="K",
    help="split each host's ranks and CPUs into K virtual nodes, each with its own proxy",
)
CPUSET = option(
    name="cpuset", section="partition", metavar="NAME",
    help="plan inside the cpuset reservation NAME made by `mckmpi partition reserve` "
         "(lwk mode); each rank is moved into its lwk cpuset",
)
OUT = option(
    name="out", section="run", default="results", type=_path, metavar="PATH",
    help="run file: a directory (a name is chosen) or a path ending in .h5",
)
TAG = option(
    name="tag", section="run", default="", type=_tag, metavar="NAME",
    help="a name for this job on its nodes (its proxy directory is mckmpi-UID/NAME-...), "
         "to find what it runs and leaves",
)
TRACE_WRITER = option(
    name="trace_writer", section="run", default="auto", choices=("auto", "parallel", "gather"),
    help="how the run file is written: parallel HDF5 (collective), gathered to rank 0, "
         "or auto (parallel when h5py has MPI)",
)
TRACE_FLUSH = option(
    name="trace_flush", section="run", default=1.0, type=_nonnegative_seconds, metavar="SECONDS",
    help="stream recorded data to the run file's spool at most this far behind (also "
         "whenever 64 MiB are pending), so a killed job keeps all but the last interval; "
         "0 writes everything at the end only",
)
SIGNAL = option(
    name="signal", section="run", default="", metavar="USR1[,USR2]",
    help="also end the run on these signals, recording the ending and writing the run file "
         "(e.g. for sbatch --signal=USR1@60); SIGTERM, SIGINT and SIGHUP always do",
)
CATALOGUE = option(
    name="catalogue", section="run", default="on", choices=("on", "off"),
    help="add the finished run to the catalogue of its output directory (catalogue.sqlite, "
         "`mckmpi runs`): rank 0 reads the file's headline metrics after writing it; a "
         "failure is a warning, never the job's",
)
HUGEPAGES = option(
    name="hugepages", section="lwk", default="auto", choices=("auto", "never", "require"),
    help="huge pages for the arena: auto uses hugetlbfs pages when reserved, else THP; "
         "require fails when neither is possible",
)
MEMLOCK = option(
    name="memlock", section="lwk", default="auto", choices=("auto", "never", "require"),
    help="lock the arena in memory (mlock); auto records why when it is not permitted",
)
MEM_FALLBACK = option(
    name="mem_fallback", section="lwk", default="error", choices=("error", "linux"),
    help="when the arena is exhausted: a MemoryError, or a counted numpy allocation",
)
RANK_POLICY = option(
    name="rank_policy", section="lwk", default="other", choices=("fifo", "other"),
    help="scheduling policy of the rank's thread: SCHED_OTHER, or SCHED_FIFO when the rank "
         "owns its cores (the reason is recorded when refused). FIFO keeps Linux tasks off "
         "the core, but RT throttling then hands the core to any waiting task for 50 ms of "
         "every second (kernel.sched_rt_runtime_us): measure before choosing it",
)
SWITCH_INTERVAL = option(
    name="isolate", section="lwk", default=False, flag=True,
    help="lwk mode, root: quiet the LWK cores for this job (IRQs, workqueues and kernel threads "
         "to the Linux cores, no deep idle), restored at its end",
)
option(
    name="switch_interval", section="lwk", default=0.1, type=_positive_seconds,
    metavar="SECONDS",
    help="Python's thread switch interval during the app (default Python: 0.005)",
)
OFFLOAD = option(
    name="offload", section="offload", default="auto", choices=("auto", "io", "none"),
    help="offload I/O system calls to the node's Linux proxy (seccomp user notification): "
         "auto = io in lwk mode, none in linux mode",
)
OFFLOAD_PROXY = option(
    name="offload_proxy", section="offload", default="", metavar="SOCKET",
    help="attach to a proxy started by hand (`mckmpi proxy --socket SOCKET`, e.g. one srun "
         "task per node) instead of starting one per node; a path no proxy can listen on is "
         "refused at once, one not listening yet is waited for (up to 30 s, said on stderr)",
)
OFFLOAD_INCLUDE = option(
    name="offload_include", section="offload", default="", metavar="PREFIXES",
    help="comma-separated path prefixes that are offloaded even under an excluded prefix",
)
OFFLOAD_EXCLUDE = option(
    name="offload_exclude", section="offload", default="/proc,/sys,/dev", metavar="PREFIXES",
    help="comma-separated path prefixes that stay native (MPI's shared memory lives in /dev)",
)
