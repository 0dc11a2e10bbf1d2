"""Helpers shared by the tests: launching `mckmpi` and real MPI jobs with timeouts, and
finding what a job left behind. Imported as `from fixtures import ...`; the pytest hooks and
fixtures live in conftest.py."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from mckmpi.jobs import launchers
from mckmpi.jobs.launchers import Job

ROOT = Path(__file__).resolve().parent.parent
APPS = ROOT / "apps"
#: The variable that marks every process of one test job (see `job_tag`, `tagged_processes`):
#: mckmpi's own job tag (`--tag`), so the job's proxy directory carries it too.
TAG_VARIABLE = "MCKMPI_TAG"


def job_env(**extra: str) -> dict[str, str]:
    """The environment of a test job: the one policy of every job (`launchers.job_env`)."""
    return launchers.job_env(extra)


def mckmpi(*args: str, timeout: float = 60, env: dict[str, str] | None = None,
           cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`mckmpi ARGS` as a subprocess (one rank or a plain command)."""
    launch = Job(("-m", "mckmpi", *args), options=None).render("local")
    return subprocess.run(launch.argv, capture_output=True, text=True, timeout=timeout,
                          env=env or launch.env, cwd=cwd)


def mpirun(n: int, *args: str, timeout: float = 90, env: dict[str, str] | None = None,
           oversubscribe: bool = False, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`mpiexec -n N python -m mckmpi ARGS`, killed (with its ranks) after `timeout`."""
    launch = Job(("-m", "mckmpi", *args), n, options=None,
                 oversubscribe=oversubscribe).render("mpiexec")
    return subprocess.run(launch.argv, capture_output=True, text=True, timeout=timeout,
                          env=env or launch.env, cwd=cwd)


def job_tag() -> dict[str, str]:
    """An environment entry that every process of a job inherits (ranks, proxies, noise),
    so `tagged_processes` finds exactly that job's leftovers on a shared machine."""
    return {TAG_VARIABLE: f"t{uuid.uuid4().hex[:12]}"}


def tagged(tag: dict[str, str]) -> dict[int, list[str]]:
    """pid -> argv of the live processes that carry `tag` in their environment."""
    needle = f"{TAG_VARIABLE}={tag[TAG_VARIABLE]}".encode()
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue  # ended meanwhile, or a kernel thread
        found[int(pid)] = [a.decode(errors="replace") for a in argv if a]
    return found


def tagged_processes(tag: dict[str, str]) -> list[str]:
    """Command lines of the live processes that carry `tag` in their environment."""
    return [" ".join(argv) for argv in tagged(tag).values()]


#: Small runs of every app (2 ranks, linux mode), plus lwk runs with offloaded I/O: the files
#: the results tests (xarray, netCDF, pandas, catalogue, notebook) read.
RESULT_RUNS = {
    "fwq-linux": ((2,), ["--samples", "200", "--quantum-us", "100"]),
    "fwq-lwk": ((1, "--mode", "lwk", "--mem", "64M"), ["--samples", "200", "--quantum-us", "100"]),
    "ftq-linux": ((2,), ["--intervals", "100", "--interval-us", "1000"]),
    "detour-linux": ((2,), ["--duration-s", "0.2"]),
    "stencil-linux": ((2,), ["--local", "24", "--iterations", "20"]),
    "cg-linux": ((2,), ["--local", "10"]),
    "allreduce-linux": ((2,), ["--sizes", "8,4K", "--iterations", "20"]),
    "checkpoint-lwk": ((1, "--mode", "lwk", "--mem", "64M"),
                       ["--elements", "20000", "--iterations", "8", "--every", "4"]),
}


def write_result_runs(directory: Path) -> dict[str, Path]:
    """`RESULT_RUNS` as real jobs writing NAME.h5 into `directory`."""
    files = {}
    for name, ((n, *opts), args) in RESULT_RUNS.items():
        out = directory / f"{name}.h5"
        proc = mpirun(n, "run", *opts, "--out", str(out), "--",
                      str(APPS / f"{name.split('-')[0]}.py"), *args, timeout=120)
        assert proc.returncode == 0, proc.stderr
        files[name] = out
    return files
class Leftovers:
    """What one job leaves on this node, found by its tag.

    The job runs with MCKMPI_TAG=tag (its proxy directory carries it, every process of the
    job inherits it) and a TMPDIR of its own, without XDG_RUNTIME_DIR, so everything it
    puts in temporary directories lands in one place. After any ending, `check` waits a
    little, then asserts: no process with the tag (nor its memfds), nothing in its TMPDIR
    but the empty per-user base directory, no /dev/shm or cgroup entry named with the tag.
    """

    def __init__(self, tag: str) -> None:
        self.tag = tag
        # short: the proxy's socket path must fit in a Unix socket address
        self.tmpdir = Path(tempfile.mkdtemp(prefix="mckmpi-t-", dir="/tmp"))
        self.env = job_env(**{TAG_VARIABLE: tag}, TMPDIR=str(self.tmpdir))
        self.env.pop("XDG_RUNTIME_DIR", None)

    def remaining(self) -> list[str]:
        found = [f"process {command[:120]}" for command in tagged_processes({TAG_VARIABLE: self.tag})]
        base = f"mckmpi-{os.geteuid()}"
        for path in sorted(self.tmpdir.rglob("*")):
            if path.name == base and path.is_dir() and not any(path.iterdir()):
                continue  # the per-user directory that holds the jobs' directories
            if path.name.startswith("ompi."):
                continue  # Open MPI's session directory: mpiexec's to remove
            if not any(p.name.startswith("ompi.") for p in path.parents):
                found.append(f"file {path}")
        for place in (Path("/dev/shm"), Path("/sys/fs/cgroup")):
            for depth in range(3):
                for path in place.glob("/".join(["*"] * (depth + 1))):
                    if self.tag in path.name:
                        found.append(f"entry {path}")
        return found

    def check(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while (found := self.remaining()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not found, f"job {self.tag} left: {found}"
