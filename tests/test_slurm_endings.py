"""Endings that Slurm causes, on a real local cluster (launch/slurm-up): scancel and a time
limit during a long FWQ under srun, and two clusters whose job ids repeat.

Slurm sends SIGTERM to every task of the step, then SIGKILL after KillWait (5 s here): the run
file must be finished inside that window, say how the job ended and hold every sample the
ranks had streamed before the signal.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mckmpi.jobs import slurm
from mckmpi.trace.reader import open_run
from mckmpi.trace.spool import read_spool

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
SLURM_UP, SLURM_DOWN = ROOT / "launch" / "slurm-up", ROOT / "launch" / "slurm-down"
SBIN_PATH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"

if not all(shutil.which(p, path=SBIN_PATH) for p in ("slurmctld", "slurmd", "munged", "srun")):
    pytest.skip("Slurm (slurm-wlm) and munge are not installed", allow_module_level=True)


def _run(argv: list, timeout: float = 60, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                          timeout=timeout, check=False, **kw)


def _env(cluster_dir: Path) -> dict[str, str]:
    out = _run(["bash", "-c", f'. "{cluster_dir}/env" && env -0'], timeout=10)
    assert out.returncode == 0, out.stderr
    env = dict(item.split("=", 1) for item in out.stdout.split("\0") if "=" in item)
    env = {k: v for k, v in env.items()
           if not k.startswith(("SLURM_", "MCKMPI_")) or k == "SLURM_CONF"}
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return env


class Cluster:
    """A one-node cluster in `directory`, stopped by `down` even when a test fails."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        up = _run([SLURM_UP, "--dir", directory, "--nodes", "1", "--cpus", "2", "--timeout",
                   "30"], timeout=90)
        assert up.returncode == 0, up.stdout + up.stderr
        self.env = _env(directory)

    def down(self) -> None:
        down = _run([SLURM_DOWN, "--dir", self.dir, "--grace", "5"], timeout=60)
        assert down.returncode == 0, down.stdout + down.stderr


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("slurm-endings"))
    try:
        yield c
    finally:
        c.down()


def _fwq_job(tmp_path: Path, out: Path, *sbatch_args: str) -> Path:
    script = tmp_path / "fwq.sh"
    script.write_text("#!/bin/sh\n" + textwrap.dedent(f"""\
        srun -n 2 {sys.executable} -m mckmpi run --mode linux --trace-flush 0.5 --out {out} \\
            -- {ROOT / 'apps' / 'fwq.py'} --samples 200000 --quantum-us 1000
    """))
    script.chmod(0o755)
    return script


def _spooled(out: Path) -> dict[int, int]:
    """FWQ samples each rank's spool holds now."""
    found = {}
    for spool in out.glob("*.h5.partial.d/rank-*.spool"):
        rec = read_spool(spool).records.get("noise/fwq_ns")
        found[int(spool.stem.split("-")[1])] = 0 if rec is None else rec[1].shape[0]
    return found


def _wait_sampling(out: Path, job: str, env: dict[str, str], timeout: float = 60) -> dict[int, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = _spooled(out)
        if len(seen) == 2 and min(seen.values()) > 200:
            return seen
        assert slurm.job_state(job, env)["state"] in ("PENDING", "RUNNING", "CONFIGURING"), \
            slurm.job_state(job, env)
        time.sleep(0.2)
    raise AssertionError(f"job {job} never streamed FWQ samples into {out}")


def _check_ended_by_sigterm(out: Path, before: dict[int, int]) -> None:
    (path,) = out.glob("*.h5")
    assert not list(out.glob("*.partial*")), "left-overs beside a complete run file"
    with open_run(path) as run:
        a = run.attrs
        assert a["complete"] and (a["ending"], a["signal"]) == ("signal", "SIGTERM"), a
        for rank, n in before.items():
            # Everything streamed before the signal, and what came after until it arrived.
            assert run.length("noise/fwq_ns", rank) >= n
    report = _run([sys.executable, "-m", "mckmpi", "report", path], timeout=60)
    assert report.returncode == 0 and "ending     signal SIGTERM" in report.stdout, report.stderr


def test_scancel_during_fwq_finishes_the_run_file(cluster, tmp_path):
    out = tmp_path / "out"
    job = slurm.submit(_fwq_job(tmp_path, out), env=cluster.env,
                       extra_args=["-n", "2", "-o", str(tmp_path / "job.log")])
    before = _wait_sampling(out, job, cluster.env)
    assert _run(["scancel", job], env=cluster.env).returncode == 0
    state = slurm.wait(job, timeout=60, poll=0.2, env=cluster.env)
    assert state["state"] == "CANCELLED", state
    _check_ended_by_sigterm(out, before)


def test_time_limit_during_fwq_finishes_the_run_file(cluster, tmp_path):
    out = tmp_path / "out"
    job = slurm.submit(_fwq_job(tmp_path, out), env=cluster.env,
                       extra_args=["-n", "2", "-o", str(tmp_path / "job.log"), "--time", "1"])
    _wait_sampling(out, job, cluster.env)
    state = slurm.wait(job, timeout=150, poll=0.5, env=cluster.env)  # 1 min, checked every 30 s
    assert state["state"] == "TIMEOUT", state
    (path,) = out.glob("*.h5")
    with open_run(path) as run:
        # The samples cover the sampling time up to the signal (most of the minute).
        sampled_s = sum(int(b.sum()) for b in run.rank_blocks("noise/fwq_ns", 0)) / 1e9
        assert sampled_s > 30, sampled_s
    _check_ended_by_sigterm(out, {})


def test_two_clusters_running_job_1_leave_two_files(tmp_path_factory, tmp_path):
    out = tmp_path / "results"
    for name in ("A", "B"):
        c = Cluster(tmp_path_factory.mktemp(f"cluster-{name}"))
        try:
            res = _run(["srun", "-n", "1", sys.executable, "-m", "mckmpi", "run", "--mode",
                        "linux", "--out", out, "--", ROOT / "apps" / "fwq.py", "--samples", "20",
                        "--quantum-us", "100"], env=c.env, timeout=90, cwd=tmp_path)
            assert res.returncode == 0, res.stderr
        finally:
            c.down()
    files = sorted(out.glob("*.h5"))
    assert len(files) == 2, files
    ids = set()
    for path in files:
        with open_run(path) as run:
            ids.add(run.attrs["slurm_job_id"])
            assert f"-{run.attrs['slurm_cluster']}-job1.0-" in path.name
    assert ids == {"1"}
