"""The main job: a small study on this host, with its report (`mckmpi demo`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mckmpi.errors import UsageError
from mckmpi.launchers import command, root_env

APPS = Path(__file__).resolve().parent.parent / "apps"


def app_path(name: str) -> Path:
    """An app of the source tree's apps/ directory."""
    path = APPS / f"{name}.py"
    if not path.is_file():
        raise UsageError(f"app {name} not found at {path}: run from a source checkout")
    return path


def launch(nranks: int, run_args: list[str], app: list[str], *, oversubscribe: bool = False,
           timeout: float = 600) -> subprocess.CompletedProcess:
    """Start `mckmpi run RUN_ARGS -- APP` as `nranks` ranks and wait (output passes through)."""
    cmd = command("mpiexec", nranks, [sys.executable, "-m", "mckmpi", "run", *run_args, "--", *app],
                  oversubscribe=oversubscribe)
    print("$ " + " ".join(cmd[:1] + cmd[1:]), flush=True)
    return subprocess.run(cmd, env=root_env(), timeout=timeout, check=False)


def demo(out: str, samples: int = 2000) -> int:
    """A 2-rank FWQ job in linux mode and the report of its run file."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_file = out_dir / "fwq-linux.h5"
    print(f"[demo 1/2] FWQ, 2 ranks, linux mode, {samples} samples per rank", flush=True)
    proc = launch(2, ["--mode", "linux", "--out", str(run_file)],
                  [str(app_path("fwq")), "--samples", str(samples)])
    if proc.returncode != 0:
        print(f"mckmpi: demo job failed with exit status {proc.returncode}", file=sys.stderr)
        return proc.returncode
    print("[demo 2/2] report", flush=True)
    from mckmpi.analysis.report import text
    from mckmpi.trace.reader import open_run

    with open_run(run_file) as run:
        print(text(run))
    return 0
