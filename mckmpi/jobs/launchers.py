"""Job launchers: how N ranks of a command are started (mpiexec, srun).

Backends register with `@launcher`; the demo, benchmarks and local studies build their
command lines through `command()` so every launch goes through one place.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence

from mckmpi.errors import UsageError

_Builder = Callable[[int, Sequence[str], bool], list[str]]
_LAUNCHERS: dict[str, _Builder] = {}


def launcher(name: str) -> Callable[[_Builder], _Builder]:
    def register(fn: _Builder) -> _Builder:
        _LAUNCHERS[name] = fn
        return fn

    return register


@launcher("mpiexec")
def _mpiexec(nranks: int, cmd: Sequence[str], oversubscribe: bool) -> list[str]:
    exe = shutil.which("mpiexec")
    if exe is None:
        raise UsageError("mpiexec not found: install Open MPI (launch/setup does)")
    args = [exe, "-n", str(nranks)]
    if oversubscribe or nranks > len(os.sched_getaffinity(0)):
        args.append("--oversubscribe")
    # mckmpi pins every rank itself; the launcher's own binding would only get in the way.
    args += ["--bind-to", "none"]
    return args + list(cmd)


@launcher("srun")
def _srun(nranks: int, cmd: Sequence[str], oversubscribe: bool) -> list[str]:
    exe = shutil.which("srun")
    if exe is None:
        raise UsageError("srun not found: is Slurm installed (launch/slurm-up starts a local one)?")
    args = [exe, "-n", str(nranks), "--cpu-bind=none"]
    if oversubscribe:
        args.append("--overcommit")
    return args + list(cmd)


def names() -> list[str]:
    return sorted(_LAUNCHERS)


def command(name: str, nranks: int, cmd: Sequence[str], oversubscribe: bool = False) -> list[str]:
    """The full command line that starts `cmd` as `nranks` ranks with launcher `name`."""
    if name not in _LAUNCHERS:
        raise UsageError(f"unknown launcher {name!r} (known: {', '.join(names())})")
    return _LAUNCHERS[name](nranks, cmd, oversubscribe)


def root_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment with Open MPI's consent to run as root (needed on CI and containers)."""
    out = dict(os.environ if env is None else env)
    if os.geteuid() == 0:
        out.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        out.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    return out
