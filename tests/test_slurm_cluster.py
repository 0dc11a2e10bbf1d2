"""A real Slurm cluster (launch/slurm-up): two slurmd on loopback, srun with PMIx, sbatch.

One cluster serves the module; it is always stopped at the end, even when a test fails.
The start/stop tests use clusters of their own so they can check exactly what they leave.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mckmpi.errors import UsageError
from mckmpi.jobs import slurm
from mckmpi.trace.reader import open_run

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
SLURM_UP = ROOT / "launch" / "slurm-up"
SLURM_DOWN = ROOT / "launch" / "slurm-down"
SBIN_PATH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"

if not all(shutil.which(p, path=SBIN_PATH) for p in ("slurmctld", "slurmd", "munged", "srun")):
    pytest.skip("Slurm (slurm-wlm) and munge are not installed", allow_module_level=True)


def run(argv: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                          timeout=timeout, check=False, **kw)


def sourced_env(cluster_dir: Path) -> dict[str, str]:
    """Our environment after sourcing the cluster's env file, as a user's shell would."""
    out = run(["bash", "-c", f'. "{cluster_dir}/env" && env -0'], timeout=10)
    assert out.returncode == 0, out.stderr
    env = dict(item.split("=", 1) for item in out.stdout.split("\0") if "=" in item)
    return {k: v for k, v in env.items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}


def daemons(cluster_dir: Path) -> list[dict]:
    return json.loads((cluster_dir / "run" / "daemons.json").read_text())


def proc_start(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] == "Z" else int(fields[19])


def slurm_down(cluster_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run([SLURM_DOWN, "--dir", cluster_dir, "--grace", "5", *extra], timeout=60)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster_dir = tmp_path_factory.mktemp("slurm")
    try:
        up = run([SLURM_UP, "--dir", cluster_dir, "--nodes", "2", "--timeout", "30"])
        assert up.returncode == 0, up.stdout + up.stderr
        yield cluster_dir, sourced_env(cluster_dir)
    finally:
        down = slurm_down(cluster_dir)
        assert down.returncode == 0, down.stdout + down.stderr


def write_script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return path


MPI_PROBE = textwrap.dedent("""
    import json, os
    from mpi4py import MPI
    from mckmpi.jobs.slurm import in_slurm_job
    comm = MPI.COMM_WORLD
    print(json.dumps({
        "rank": comm.rank, "size": comm.size, "node": os.environ["SLURM_NODEID"],
        "nodename": os.environ["SLURMD_NODENAME"], "sum": comm.allreduce(comm.rank + 1),
        "shm": os.environ.get("OMPI_MCA_btl_vader_backing_directory"),
        "in_job": in_slurm_job(),
    }), flush=True)
""")


def test_slurm_up_is_idempotent(cluster):
    cluster_dir, _ = cluster
    before = daemons(cluster_dir)
    again = run([SLURM_UP, "--dir", cluster_dir, "--nodes", "2"])
    assert again.returncode == 0, again.stderr
    assert "already up" in again.stdout
    assert daemons(cluster_dir) == before
    other = run([SLURM_UP, "--dir", cluster_dir, "--nodes", "3"])
    assert other.returncode == 1 and "slurm-down" in other.stderr


def test_cluster_is_reachable_and_offers_pmix(cluster):
    cluster_dir, env = cluster
    assert slurm.slurm_available(env)
    assert not slurm.slurm_available({**env, "SLURM_CONF": str(cluster_dir / "missing.conf")})
    assert "pmix" in slurm.mpi_plugins(env)


def test_srun_pmix_spans_both_nodes(cluster, tmp_path):
    _, env = cluster
    res = run(["srun", "-N", "2", "-n", "2", "--mpi=pmix", sys.executable, "-c", MPI_PROBE],
              timeout=60, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    ranks = sorted((json.loads(line) for line in res.stdout.splitlines()),
                   key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == [0, 1]
    assert {r["node"] for r in ranks} == {"0", "1"}
    assert {r["nodename"] for r in ranks} == {"n1", "n2"}
    assert all(r["size"] == 2 and r["sum"] == 3 and r["in_job"] for r in ranks)
    # Both virtual nodes share a hostname: each needs its own Open MPI shared-memory directory.
    assert ranks[0]["shm"] and ranks[1]["shm"] and ranks[0]["shm"] != ranks[1]["shm"]


def test_sbatch_job_with_mpi_step_completes(cluster, tmp_path):
    _, env = cluster
    (tmp_path / "probe.py").write_text(MPI_PROBE)
    script = write_script(tmp_path / "ok.sh", f"""\
        echo "batch $SLURM_JOB_ID on $SLURM_JOB_NODELIST"
        srun --mpi=pmix {sys.executable} probe.py
    """)
    job = slurm.submit(script, env=env, extra_args=[
        "-N", "2", "-n", "2", "--chdir", str(tmp_path), "-o", str(tmp_path / "ok-%j.out")])
    state = slurm.wait(job, timeout=45, poll=0.2, env=env)
    assert (state["state"], state["exit_code"], state["source"]) == ("COMPLETED", 0, "scontrol")
    assert state["stdout"] == str(tmp_path / f"ok-{job}.out")
    out = Path(state["stdout"]).read_text().splitlines()
    assert out[0] == f"batch {job} on n[1-2]"
    ranks = [json.loads(line) for line in out[1:]]
    assert sorted(r["node"] for r in ranks) == ["0", "1"]
    assert all(r["sum"] == 3 for r in ranks)


@pytest.mark.parametrize("mode_args", [
    [],
    # Both Slurm nodes of this cluster are one host, so their LWK cores are the same CPU:
    # SCHED_FIFO ranks of the two nodes would spin on it forever, hence the ordinary policy.
    ["--mode", "lwk", "--oversubscribe", "--mem", "32M", "--rank-policy", "other"],
], ids=["linux", "lwk"])
def test_srun_of_mckmpi_run_spans_both_nodes(cluster, tmp_path, mode_args):
    _, env = cluster
    env = {**env, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    env = {k: v for k, v in env.items() if not k.startswith("MCKMPI_")}
    res = run(["srun", "-N", "2", "-n", "2", sys.executable, "-m", "mckmpi", "run", *mode_args,
               "--out", tmp_path, "--", ROOT / "apps" / "fwq.py", "--samples", "50",
               "--quantum-us", "100"], timeout=60, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    (path,) = tmp_path.glob("fwq-*.h5")
    mode = "lwk" if mode_args else "linux"
    assert re.fullmatch(rf"fwq-{mode}-mckmpi-job\d+\.0-[0-9a-f]{{6}}\.h5", path.name), path.name
    with open_run(path) as r:
        assert (r.attrs["launcher"], r.attrs["nnodes"], r.attrs["world_size"]) == ("slurm", 2, 2)
        assert r.attrs["mode"] == mode and r.attrs["slurm_nodelist"] == "n[1-2]"
        assert f"-job{r.attrs['slurm_job_id']}.0-" in path.name
        assert r.attrs["slurm_cluster"] == "mckmpi" and r.attrs["ending"] == "normal"
        assert sorted(r.provenance["hosts"]) == ["n1", "n2"]
        assert sorted(h.decode() for h in r.ranks["host"]) == ["n1", "n2"]
        assert r.read("noise/fwq_ns").shape == (2, 50)
        plans = r.provenance["node_plans"]
        assert len(plans) == 2 and all(p.startswith(f"{mode}: ") for p in plans)


def test_failing_job_reports_exit_code_and_log(cluster, tmp_path):
    _, env = cluster
    script = write_script(tmp_path / "bad.sh", "echo 'input deck missing' >&2\nexit 7\n")
    job = slurm.submit(script, env=env, extra_args=["-o", str(tmp_path / "bad-%j.log")])
    state = slurm.wait(job, timeout=30, poll=0.2, env=env)
    assert (state["state"], state["exit_code"], state["signal"]) == ("FAILED", 7, 0)
    assert state["stdout"] == str(tmp_path / f"bad-{job}.log")
    assert "input deck missing" in Path(state["stdout"]).read_text()
    # Without slurmdbd the completion log is the record that outlives the controller's memory.
    logged = slurm._from_jobcomp(job, env)
    assert logged is not None
    assert (logged["state"], logged["exit_code"], logged["source"]) == ("FAILED", 7, "jobcomp")


def test_job_state_falls_back_to_accounting(cluster, tmp_path):
    # This cluster has no slurmdbd; an accounting record as a site's sacct prints it stands in
    # for a job the controller has forgotten.
    _, env = cluster
    write_script(tmp_path / "sacct", """\
        case "$*" in *"-j 999998 "*) echo 'CANCELLED by 0|0:15|n[1-2]|sweep|a' ;; esac
    """)
    env = {**env, "PATH": f"{tmp_path}:{env['PATH']}"}
    state = slurm.job_state("999998", env)
    assert (state["source"], state["state"], state["exit_code"], state["signal"]) == (
        "sacct", "CANCELLED", 0, 15)
    assert (state["nodes"], state["name"], state["stdout"]) == ("n[1-2]", "sweep|a", None)
    with pytest.raises(slurm.JobNotFound):
        slurm.job_state("999997", env)


def test_job_lookup_errors(cluster, tmp_path):
    _, env = cluster
    with pytest.raises(slurm.JobNotFound, match="999999"):
        slurm.job_state(999999, env)
    with pytest.raises(slurm.SlurmError, match="not a Slurm job id"):
        slurm.job_state("12; rm -rf", env)
    with pytest.raises(slurm.SlurmError, match="does not exist"):
        slurm.submit(tmp_path / "nope.sh", env=env)
    too_big = write_script(tmp_path / "big.sh", "true\n")
    with pytest.raises(slurm.SlurmError, match="sbatch rejected .*More processors"):
        slurm.submit(too_big, env=env, extra_args=["-n", "1000"])


def test_wait_times_out_on_a_pending_job(cluster, tmp_path):
    _, env = cluster
    script = write_script(tmp_path / "later.sh", "true\n")
    job = slurm.submit(script, env=env, extra_args=["--begin=now+600", "-o", "/dev/null"])
    try:
        with pytest.raises(slurm.JobTimeout, match=f"job {job} still PENDING"):
            slurm.wait(job, timeout=1, poll=0.2, env=env)
    finally:
        run(["scancel", job], timeout=10, env=env)
    assert slurm.wait(job, timeout=20, poll=0.2, env=env)["state"] == "CANCELLED"


def test_partitions_and_nodes(cluster):
    _, env = cluster
    (part,) = slurm.partitions(env)
    assert (part.name, part.nodes, part.default, part.state) == ("mckmpi", "n[1-2]", True, "UP")
    nodes = slurm.nodes(part.nodes, env)
    assert [n.name for n in nodes] == ["n1", "n2"]
    cpus = len(os.sched_getaffinity(0))
    assert all((n.cpus, n.usable_cpus, n.spec_cpus, n.partitions) == (cpus, cpus, (), ("mckmpi",))
               for n in nodes)
    assert slurm.config(env)["MpiDefault"] == "pmix"
    with pytest.raises(slurm.SlurmError, match="scontrol show node n9 failed: Node n9 not found"):
        slurm.nodes("n9", env)


def test_expand_hostlist(cluster):
    _, env = cluster
    assert slurm.expand_hostlist("n[1-2]", env) == ["n1", "n2"]
    assert slurm.expand_hostlist("n[1-3],gpu[07-08],login", env) == [
        "n1", "n2", "n3", "gpu07", "gpu08", "login"]
    for bad in ("", "n[1-"):
        with pytest.raises(slurm.SlurmError):
            slurm.expand_hostlist(bad, env)


def test_missing_slurm_is_one_clear_error(tmp_path):
    env = {"PATH": str(tmp_path)}
    with pytest.raises(slurm.SlurmNotFound, match="scontrol not found") as err:
        slurm.expand_hostlist("n[1-2]", env)
    assert isinstance(err.value, UsageError) and "\n" not in str(err.value)
    assert not slurm.slurm_available(env)
    assert slurm.in_slurm_job({"SLURM_JOB_ID": "12"})
    assert not slurm.in_slurm_job({"PATH": "/bin"})


def test_slurm_down_stops_exactly_the_recorded_daemons(tmp_path_factory):
    cluster_dir = tmp_path_factory.mktemp("down") / "c"
    bystander = subprocess.Popen(["sleep", "120"])
    try:
        up = run([SLURM_UP, "--dir", cluster_dir, "--nodes", "1", "--timeout", "30"])
        assert up.returncode == 0, up.stdout + up.stderr
        recorded = daemons(cluster_dir)
        assert sorted(r["name"] for r in recorded) == ["munged", "slurmctld", "slurmd-n1"]
        assert all(proc_start(r["pid"]) == r["start"] for r in recorded)
        assert "TaskPlugin=task/affinity" in (cluster_dir / "slurm.conf").read_text()
        # A record whose PID now belongs to another process (start time differs) is left alone.
        fake = {"name": "slurmd-old", "pid": bystander.pid, "start": -1, "argv": ["slurmd"]}
        (cluster_dir / "run" / "daemons.json").write_text(json.dumps(recorded + [fake]))

        down = slurm_down(cluster_dir)
        assert down.returncode == 0, down.stderr
        assert all(proc_start(r["pid"]) != r["start"] for r in recorded)
        assert bystander.poll() is None
        assert not (cluster_dir / "munge" / "munge.socket").exists()
        assert (cluster_dir / "log" / "slurmctld.log").stat().st_size > 0
        assert "no running daemons" in slurm_down(cluster_dir).stdout
        purge = slurm_down(cluster_dir, "--purge")
        assert purge.returncode == 0 and not cluster_dir.exists()
    finally:
        bystander.kill()
        bystander.wait()
        if cluster_dir.exists():
            slurm_down(cluster_dir)


def test_failed_start_shows_logs_and_leaves_nothing_running(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fail")
    fake_bin = tmp / "bin"
    fake_bin.mkdir()
    write_script(fake_bin / "slurmctld", "echo 'fatal: controller cannot start' >&2\nexit 1\n")
    cluster_dir = tmp / "c"
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ.get('PATH', '')}"}
    try:
        up = run([SLURM_UP, "--dir", cluster_dir, "--nodes", "1", "--timeout", "20"], env=env)
        assert up.returncode == 1
        assert "slurmctld -D" in up.stderr and "exited with status 1" in up.stderr
        assert "fatal: controller cannot start" in up.stderr
        assert not (cluster_dir / "run" / "daemons.json").exists()
        assert not (cluster_dir / "munge" / "munge.socket").exists()
    finally:
        slurm_down(cluster_dir)
