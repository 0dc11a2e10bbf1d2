"""One way to launch a job: a `Job` spec, rendered into argv and env by a backend.

Like ReFrame's launcher/scheduler split, *what* runs (ranks, virtual nodes, oversubscription,
`mckmpi run` options, the app and its arguments, the job's extra environment) is a `Job`,
and *how* it is started is a backend registered with `@backend`: `mpiexec`, `srun`, or
`local` (one rank, no launcher). The demo, local study points, the benchmarks and the tests
build a Job and ask a backend for its `Launch` (argv + env); none builds a command line or an
environment by hand.

Every job gets its environment from one policy, `job_env`: inherit the caller's, drop what
would leak the caller's own job into it (MCKMPI_* settings, Open MPI's and PMI's rank
variables), add Open MPI's consent to run as root when root, then the job's extras.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from mckmpi import config
from mckmpi.errors import UsageError

#: Variables of the caller that must not reach a job: its own mckmpi settings and the rank
#: identity its launcher gave it (a job started from inside a rank would inherit them).
DROPPED_PREFIXES = ("MCKMPI_", "OMPI_COMM_WORLD", "PMI")
#: Open MPI refuses to run as root without both.
ROOT_CONSENT = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def job_env(extra: Mapping[str, str] | None = None, base: Mapping[str, str] | None = None,
            root: bool | None = None) -> dict[str, str]:
    """The environment of a job: `base` (default: ours) without MCKMPI_*, OMPI_COMM_WORLD*
    and PMI* variables, with Open MPI's run-as-root consent when `root` (default: whether we
    are root), then `extra`, which wins over everything."""
    env = {k: v for k, v in (os.environ if base is None else base).items()
           if not k.startswith(DROPPED_PREFIXES)}
    if os.geteuid() == 0 if root is None else root:
        env.update(ROOT_CONSENT)
    env.update(extra or {})
    return env


@dataclass(frozen=True)
class Job:
    """What to start: `ranks` ranks of `app` (a Python file or `-m MODULE`, with arguments).

    With `options` (a mapping of `mckmpi run` option names to values, possibly empty) each rank
    runs `mckmpi run OPTIONS -- APP`; with `options=None` the app runs bare under the Python
    interpreter (a baseline, or `-m mckmpi CMD` itself). `oversubscribe` lets the launcher put
    more ranks than cores on a node and, under `mckmpi run`, the partition too; `vnodes` splits
    each host into virtual nodes (`mckmpi run --vnodes`). `env` holds the job's own variables.
    """

    app: tuple[str, ...]
    ranks: int = 1
    options: Mapping[str, Any] | None = field(default_factory=dict)
    vnodes: int = 1
    oversubscribe: bool = False
    env: Mapping[str, str] = field(default_factory=dict)
    python: str = sys.executable

    def __post_init__(self) -> None:
        object.__setattr__(self, "app", tuple(self.app))
        if self.options is not None:
            object.__setattr__(self, "options", MappingProxyType(dict(self.options)))
        object.__setattr__(self, "env", MappingProxyType(dict(self.env)))
        if self.ranks < 1 or self.vnodes < 1:
            raise UsageError(f"a job needs at least one rank and one node, got {self.ranks} "
                             f"rank(s) on {self.vnodes} node(s)")
        if self.options is None and self.vnodes > 1:
            raise UsageError("virtual nodes need mckmpi run: a bare job has none")
        if not self.app:
            raise UsageError("a job needs an app")

    def program(self) -> list[str]:
        """What every rank executes."""
        if self.options is None:
            return [self.python, *self.app]
        options = dict(self.options)
        for owned in ("oversubscribe", "vnodes"):
            if owned in options:
                raise UsageError(f"{owned} is a field of the Job, not one of its options")
        if self.oversubscribe:
            options["oversubscribe"] = True
        if self.vnodes > 1:
            options["vnodes"] = self.vnodes
        argv = [self.python, "-m", "mckmpi", "run", *config.to_argv(options)]
        if self.app[0] == "-m":
            return [*argv, "-m", *self.app[1:2], "--", *self.app[2:]]
        return [*argv, "--", *self.app]

    def render(self, backend: str) -> Launch:
        """The argv and env that start this job with `backend`."""
        if backend not in _BACKENDS:
            raise UsageError(f"unknown launcher {backend!r} (known: {', '.join(names())})")
        return Launch(_BACKENDS[backend](self, self.program()), job_env(self.env))


@dataclass(frozen=True)
class Launch:
    """A rendered job: the command line and the environment to start it with."""

    argv: list[str]
    env: dict[str, str]

    def run(self, timeout: float, **kwargs: Any) -> subprocess.CompletedProcess:
        """Start it and wait at most `timeout` seconds (subprocess.run's other arguments pass)."""
        return subprocess.run(self.argv, env=self.env, timeout=timeout, check=False, **kwargs)


_Backend = Callable[[Job, Sequence[str]], list[str]]
_BACKENDS: dict[str, _Backend] = {}


def backend(name: str) -> Callable[[_Backend], _Backend]:
    """Register a backend: a function of (job, the program of every rank) -> argv."""
    def register(fn: _Backend) -> _Backend:
        _BACKENDS[name] = fn
        return fn

    return register


def names() -> list[str]:
    return sorted(_BACKENDS)


def _which(program: str, hint: str) -> str:
    exe = shutil.which(program)
    if exe is None:
        raise UsageError(f"{program} not found: {hint}")
    return exe


@backend("mpiexec")
def _mpiexec(job: Job, program: Sequence[str]) -> list[str]:
    args = [_which("mpiexec", "install Open MPI (launch/setup does)"), "-n", str(job.ranks)]
    if job.oversubscribe or job.ranks > len(os.sched_getaffinity(0)):
        args.append("--oversubscribe")
    # mckmpi pins every rank itself; the launcher's own binding would only get in the way.
    return [*args, "--bind-to", "none", *program]


@backend("srun")
def _srun(job: Job, program: Sequence[str]) -> list[str]:
    args = [_which("srun", "is Slurm installed (launch/slurm-up starts a local one)?"),
            "-n", str(job.ranks), "--cpu-bind=none"]
    if job.oversubscribe:
        args.append("--overcommit")
    return [*args, *program]


@backend("local")
def _local(job: Job, program: Sequence[str]) -> list[str]:
    if job.ranks != 1:
        raise UsageError(f"the local launcher starts one rank, not {job.ranks}: use mpiexec "
                         "or srun")
    return list(program)
