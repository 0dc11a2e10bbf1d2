"""Jobs: how each backend renders a Job spec into argv and env, and the one env policy."""

from __future__ import annotations

import os
import stat
import sys

import pytest

from mckmpi.errors import UsageError
from mckmpi.jobs import launchers
from mckmpi.jobs.launchers import Job


@pytest.fixture
def fake_launchers(tmp_path, monkeypatch):
    """mpiexec and srun found on PATH (rendering never runs them)."""
    for name in ("mpiexec", "srun"):
        exe = tmp_path / name
        exe.write_text("#!/bin/sh\nexit 99\n")
        exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", str(tmp_path))
    return tmp_path


def test_mpiexec_runs_mckmpi_run_with_typed_options(fake_launchers):
    job = Job(("apps/fwq.py", "--samples", "10"), 2,
              {"mode": "lwk", "mem": 32 * 2**20, "lwk_cores": (1,), "out": "r.h5"})
    assert job.render("mpiexec").argv == [
        str(fake_launchers / "mpiexec"), "-n", "2", "--bind-to", "none",
        sys.executable, "-m", "mckmpi", "run", "--mode", "lwk", "--mem", "33554432",
        "--lwk-cores", "1-1", "--out", "r.h5", "--", "apps/fwq.py", "--samples", "10"]


def test_oversubscribe_and_vnodes_reach_launcher_and_partition(fake_launchers):
    job = Job(("-m", "mckmpi.bench.report", "--samples", "5"), 4, {"trace_writer": "gather"},
              vnodes=2, oversubscribe=True)
    assert job.render("mpiexec").argv[1:] == [
        "-n", "4", "--oversubscribe", "--bind-to", "none", sys.executable, "-m", "mckmpi", "run",
        "--trace-writer", "gather", "--oversubscribe", "--vnodes", "2",
        "-m", "mckmpi.bench.report", "--", "--samples", "5"]
    assert job.render("srun").argv[1:6] == ["-n", "4", "--cpu-bind=none", "--overcommit",
                                             sys.executable]


def test_more_ranks_than_cpus_oversubscribe_mpiexec_only(fake_launchers):
    n = len(os.sched_getaffinity(0)) + 1
    argv = Job(("a.py",), n).render("mpiexec").argv
    assert "--oversubscribe" in argv[:5] and argv[-4:] == ["mckmpi", "run", "--", "a.py"]


def test_bare_and_local_jobs(fake_launchers):
    bare = Job(("-m", "mckmpi", "report", "x.h5"), options=None)
    assert bare.render("local").argv == [sys.executable, "-m", "mckmpi", "report", "x.h5"]
    assert bare.render("srun").argv == [str(fake_launchers / "srun"), "-n", "1",
                                        "--cpu-bind=none", sys.executable, "-m", "mckmpi",
                                        "report", "x.h5"]
    assert Job(("a.py",), options={}).render("local").argv == [
        sys.executable, "-m", "mckmpi", "run", "--", "a.py"]


@pytest.mark.parametrize("job, backend, message", [
    (Job(("a.py",), 2), "local", "the local launcher starts one rank"),
    (Job(("a.py",)), "qsub", "unknown launcher 'qsub'"),
    (Job(("a.py",), options={"colour": "red"}), "local", "unknown option 'colour'"),
    (Job(("a.py",), options={"vnodes": 2}), "local", "vnodes is a field of the Job"),
])
def test_jobs_a_backend_refuses(job, backend, message):
    with pytest.raises(UsageError, match=message):
        job.render(backend)


def test_a_job_needs_ranks_an_app_and_the_harness_for_vnodes():
    with pytest.raises(UsageError, match="at least one rank"):
        Job(("a.py",), 0)
    with pytest.raises(UsageError, match="needs an app"):
        Job(())
    with pytest.raises(UsageError, match="virtual nodes need mckmpi run"):
        Job(("a.py",), options=None, vnodes=2)


def test_missing_launcher_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UsageError, match="mpiexec not found"):
        Job(("a.py",)).render("mpiexec")
    with pytest.raises(UsageError, match="srun not found"):
        Job(("a.py",)).render("srun")


CALLER = {"PATH": "/bin", "HOME": "/h", "MCKMPI_MODE": "lwk", "MCKMPI_CONFIG": "c.toml",
          "OMPI_COMM_WORLD_RANK": "3", "PMI_RANK": "3", "PMIX_RANK": "3", "OMPI_MCA_x": "1",
          "SLURM_JOB_ID": "7"}


def test_env_policy_drops_the_callers_job_and_adds_root_consent():
    env = launchers.job_env({"MCKMPI_MEM": "64M", "HOME": "/job"}, base=CALLER, root=True)
    assert env == {"PATH": "/bin", "HOME": "/job", "OMPI_MCA_x": "1", "SLURM_JOB_ID": "7",
                   "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
                   "MCKMPI_MEM": "64M"}
    assert "OMPI_ALLOW_RUN_AS_ROOT" not in launchers.job_env(base=CALLER, root=False)
    # The job's extras win, even over the consent.
    assert launchers.job_env({"OMPI_ALLOW_RUN_AS_ROOT": "0"}, base={},
                             root=True)["OMPI_ALLOW_RUN_AS_ROOT"] == "0"


def test_rendered_env_follows_the_policy(monkeypatch):
    monkeypatch.setenv("MCKMPI_MODE", "lwk")
    monkeypatch.setenv("PMI_RANK", "1")
    env = Job(("a.py",), env={"MCKMPI_OFFLOAD": "none"}).render("local").env
    assert env == launchers.job_env({"MCKMPI_OFFLOAD": "none"})
    assert "MCKMPI_MODE" not in env and "PMI_RANK" not in env and env["MCKMPI_OFFLOAD"] == "none"
    assert ("OMPI_ALLOW_RUN_AS_ROOT" in env) == (os.geteuid() == 0)


def test_a_local_job_runs(tmp_path):
    launch = Job(("-c", "import os, sys; print(sys.argv[1], os.environ['X'])", "hi"),
                 options=None, env={"X": "there"}).render("local")
    proc = launch.run(30, capture_output=True, text=True, cwd=tmp_path)
    assert (proc.returncode, proc.stdout) == (0, "hi there\n")
