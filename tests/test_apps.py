"""Every app: bare runs, option errors, --help, and runs on arena memory with a scheduler.

Also home of the helpers the other app tests share (`run_app`, `LAYOUTS`, `APP_ARGS`).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fixtures import APPS, job_env, mpirun

#: Small, quick arguments for every app.
APP_ARGS = {
    "fwq": ["--samples", "200", "--quantum-us", "100"],
    "ftq": ["--intervals", "100", "--interval-us", "1000"],
    "detour": ["--duration-s", "0.2"],
    "stencil": ["--local", "24", "--iterations", "20"],
    "cg": ["--local", "10"],
    "allreduce": ["--sizes", "8,4K", "--iterations", "20"],
    "checkpoint": ["--elements", "20000", "--iterations", "8", "--every", "4"],
}

#: Job layouts every app must pass its own check in: (ranks, mckmpi run options).
LAYOUTS = {
    "1": (1, ()),
    "2": (2, ()),
    "4-oversubscribed": (4, ("--oversubscribe",)),
    "vnodes2": (2, ("--vnodes", "2")),
    # lwk mode: arena, scheduler and offloaded I/O, one proxy per (virtual) node; on a 2-CPU
    # host two virtual nodes have a CPU each, shared by the rank and its node's proxy
    "lwk-1": (1, ("--mode", "lwk", "--mem", "64M")),
    "lwk-4-oversubscribed": (4, ("--mode", "lwk", "--mem", "64M", "--oversubscribe")),
    "lwk-vnodes2": (2, ("--mode", "lwk", "--mem", "64M", "--vnodes", "2", "--oversubscribe")),
}


def run_app(tmp_path: Path, layout: str, app: str, *args: str,
            timeout: float = 90) -> tuple[subprocess.CompletedProcess, Path]:
    """`mpiexec -n N mckmpi run [layout options] --out FILE -- apps/APP.py ARGS`."""
    n, opts = LAYOUTS[layout]
    out = tmp_path / f"{app}-{layout}.h5"
    proc = mpirun(n, "run", *opts, "--out", str(out), "--", str(APPS / f"{app}.py"), *args,
                  oversubscribe=n > 2, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return proc, out


def bare(n: int, app: str, *args: str, cwd: Path | None = None,
         timeout: float = 60) -> subprocess.CompletedProcess:
    """`mpiexec -n N python apps/APP.py ARGS`, without the harness."""
    cmd = ["mpiexec", "-n", str(n), sys.executable, str(APPS / f"{app}.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=job_env(), cwd=cwd)


@pytest.mark.parametrize("app", sorted(APP_ARGS))
def test_bare_run_verifies_and_writes_nothing(app, tmp_path):
    proc = bare(2, app, *APP_ARGS[app], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{app}: ") and "2 ranks" in proc.stdout.splitlines()[0]
    assert "FAILED" not in proc.stdout
    assert not list(tmp_path.rglob("*.h5"))


BAD_OPTIONS = [
    ("fwq", ["--samples", "-5"], "--samples: must be a positive integer"),
    ("fwq", ["--quantum-us", "2"], "below the benchmark's resolution"),
    ("ftq", ["--interval-us", "1"], "below the benchmark's resolution"),
    ("detour", ["--duration-s", "-1"], "--duration-s: must be a positive number"),
    ("stencil", ["--scaling", "strong", "--size", "101x64"], "does not divide among 2 ranks"),
    ("stencil", ["--local", "-8"], "--local: must be positive integers"),
    ("cg", ["--local", "4x4"], "has 2 axes, the grid has 3"),
    ("allreduce", ["--sizes", "8,12"], "12 bytes is not a whole number"),
    ("checkpoint", ["--every", "20", "--iterations", "10"], "no checkpoint would be written"),
    ("checkpoint", ["--dir", "/proc/mckmpi-checkpoints"], "--dir /proc/mckmpi-checkpoints: "),
    ("fwq", ["--inject-noise", "1000:2000"], "leaves no time to compute"),
    ("stencil", ["--inject-noise", "100:10:0,5"], "rank 5 does not exist in a job of 2 ranks"),
]


def _error_lines(app: str, stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"{app}: error:")]


@pytest.mark.parametrize("app,args,message", BAD_OPTIONS,
                         ids=[f"{a}{' '.join(x)}" for a, x, _ in BAD_OPTIONS])
def test_bad_options_one_line_exit_2(app, args, message):
    proc = bare(2, app, *args, timeout=30)
    assert proc.returncode == 2, proc.stderr
    lines = _error_lines(app, proc.stderr)
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_bad_options_under_the_harness_exit_2(tmp_path):
    proc = mpirun(2, "run", "--out", str(tmp_path), "--", str(APPS / "stencil.py"), "--scaling",
                  "strong", "--ndim", "3", "--size", "9", timeout=30)
    assert proc.returncode == 2
    lines = _error_lines("stencil", proc.stderr)
    assert len(lines) == 1 and "9 points over 2" in lines[0], proc.stderr
    assert not list(tmp_path.glob("*.h5"))


def test_help_is_printed_once():
    proc = bare(2, "cg", "--help", timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("usage: cg") == 1
    assert "--inject-noise" in proc.stdout and "--scaling" in proc.stdout


DRIVER = """\
import os, runpy, sys
from mckmpi.context import Context, set_context
from mckmpi.lwk.arena import Arena
from mckmpi.lwk.scheduler import Scheduler
from mckmpi.node.placement import from_env
from mckmpi.trace.tracer import Tracer

from mpi4py import MPI

tracer, sched, arena = Tracer(), Scheduler(), Arena(64 << 20)
tracer_rank = MPI.COMM_WORLD.Get_rank
set_context(Context(placement=from_env(os.environ), mode="lwk", harness=True, tracer=tracer,
                    mem=arena, scheduler=sched))
report, sys.argv = sys.argv[1], sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
with open(f"{report}.{tracer_rank()}", "w") as fh:
    fh.write(f"{','.join(sorted(tracer.records))} {sched.stats()['tasks_spawned']} {arena.stats()['peak']}")
"""


@pytest.mark.parametrize("app", sorted(APP_ARGS))
def test_runs_on_arena_memory_as_scheduler_tasks(app, tmp_path):
    """What lwk mode hands an app: arena memory and a cooperative scheduler."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    args = APP_ARGS[app] + (["--async"] if app == "checkpoint" else [])
    report = tmp_path / "report"
    cmd = ["mpiexec", "-n", "2", sys.executable, str(driver), str(report), str(APPS / f"{app}.py"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=job_env())
    assert proc.returncode == 0, proc.stderr
    group = "app" if app in ("stencil", "cg", "allreduce", "checkpoint") else "noise"
    for rank in (0, 1):
        records, tasks, peak = Path(f"{report}.{rank}").read_text().split()
        assert any(r.startswith(group + "/") for r in records.split(",")), records
        assert int(tasks) == (2 if app == "checkpoint" else 1)
        assert int(peak) >= 4 << 10, "buffers did not come from the arena"
    if app == "checkpoint":
        assert "(scheduler)" in proc.stdout and "verified" in proc.stdout
