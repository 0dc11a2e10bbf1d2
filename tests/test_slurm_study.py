"""Studies: plan -> submit -> status -> collect on a real Slurm, `study run` on this host,
core specialisation, failed jobs and plans that do not fit the cluster.

The Slurm tests share one two-node cluster whose nodes each keep one of their two CPUs
specialised (`slurm-up --core-spec 1`), so lwk jobs exercise the core-spec path; it is
always stopped at the end, even when a test fails.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixtures import ROOT, job_env, mckmpi
from mckmpi.analysis import study as study_file
from mckmpi.jobs import slurm, study
from mckmpi.node.host import NodeFacts
from mckmpi.node.partition import core_spec_linux_cores
from mckmpi.trace.reader import open_run

SLURM_UP = ROOT / "launch" / "slurm-up"
SLURM_DOWN = ROOT / "launch" / "slurm-down"
SBIN_PATH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
HAVE_SLURM = all(shutil.which(p, path=SBIN_PATH) for p in ("slurmctld", "slurmd", "munged"))
TINY_STENCIL = ["--scaling", "weak", "--size", "16", "--app-args", "--iterations 5 --warmup 1"]
SPEC_NODE = (
    "NodeName=n1 Arch=x86_64 CoresPerSocket=4  CPUAlloc=0 CPUEfctv=3 CPUTot=4 CPULoad=0.52 "
    "AvailableFeatures=(null) ActiveFeatures=(null) Gres=(null) NodeAddr=127.0.0.1 "
    "NodeHostName=vm Version=22.05.8 OS=Linux 6.1.0 #1 SMP PREEMPT_DYNAMIC  RealMemory=1 "
    "AllocMem=0 FreeMem=20594 Sockets=1 Boards=1 CoreSpecCount=1 CPUSpecList=3  State=IDLE "
    "ThreadsPerCore=1 TmpDisk=0 Weight=1 Owner=N/A MCS_label=N/A Partitions=batch,debug  "
    "BootTime=2026-11-26T16:15:55 CfgTRES=cpu=3,mem=1M,billing=3 AllocTRES= CapWatts=n/a")


def run(argv: list, timeout: float = 60, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                          timeout=timeout, check=False, **kw)


def mck(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return mckmpi(*args, env=env, timeout=timeout)


def node(**changes: object) -> slurm.NodeInfo:
    return dataclasses.replace(slurm.parse_node(slurm.parse_fields(SPEC_NODE)), **changes)


def status_rows(text: str) -> dict[str, list[str]]:
    """`study status` table rows by point name: job, state, exit, ending, log, note words."""
    return {ln.split()[0]: ln.split()[1:] for ln in text.splitlines()
            if ln.split() and ln.split()[0].count("-") >= 2 and not ln.startswith("--")}


def cluster_of(nodes: list[slurm.NodeInfo], allow: bool = True) -> study.Cluster:
    return study.Cluster(partition="batch", nodelist="n[1-2]", nodes=tuple(nodes),
                         allow_spec_usage=allow, mpi_plugins=("pmix",), task_plugin="task/none")


# --- pure parts: no Slurm needed -----------------------------------------------------------


def test_specialised_cores_become_linux_cores_only_where_the_step_may_use_them():
    whole = NodeFacts(cpus=(0, 1, 2, 3))
    assert core_spec_linux_cores(whole, [3]) == (3,)
    assert core_spec_linux_cores(whole, (2, 3, 3)) == (2, 3)
    # Slurm fenced them off (outside the step's CPUs): the usual default applies.
    assert core_spec_linux_cores(NodeFacts(cpus=(0, 1, 2)), [3]) is None
    assert core_spec_linux_cores(NodeFacts(cpus=(0, 1, 2)), [2, 3]) is None
    # No LWK core would be left, or nothing is specialised.
    assert core_spec_linux_cores(NodeFacts(cpus=(3,)), [3]) is None
    assert core_spec_linux_cores(whole, []) is None


def test_node_records_of_scontrol():
    info = node()
    assert (info.name, info.hostname, info.cpus, info.usable_cpus) == ("n1", "vm", 4, 3)
    assert (info.core_spec_count, info.spec_cpus, info.partitions) == (1, (3,), ("batch", "debug"))
    old = slurm.parse_node({"NodeName": "c7", "CPUTot": "8", "Partitions": "(null)"})
    assert (old.hostname, old.usable_cpus, old.spec_cpus, old.partitions) == ("c7", 8, (), ())


def test_lwk_points_use_the_specialised_cores_when_the_cluster_allows():
    two = [node(), node(name="n2", hostname="other")]
    adj = study.slurm_adjust("lwk", 3, cluster_of(two), {})
    assert adj.sbatch == ["--core-spec=0"] and adj.run_args == ["--linux-cores", "3-3"]
    assert not adj.oversubscribe
    assert study.slurm_adjust("linux", 3, cluster_of(two), {}).run_args == []
    # A user's own Linux cores win; then one of the 3 job CPUs is Linux's: oversubscribed.
    own = study.slurm_adjust("lwk", 3, cluster_of(two), {"linux_cores": "1"})
    assert own.sbatch == [] and own.run_args == ["--oversubscribe"]
    kept = study.slurm_adjust("lwk", 2, cluster_of(two, allow=False), {})
    assert kept.sbatch == [] and kept.run_args == []
    assert "AllowSpecResourcesUsage=No" in kept.notes[0]
    # Nodes on one host: FIFO ranks of two nodes would share a CPU, which a note says.
    one_host = cluster_of([node(), node(name="n2")], allow=False)
    assert not any("fifo" in n for n in study.slurm_adjust("lwk", 2, one_host, {}).notes)
    fifo = study.slurm_adjust("lwk", 2, one_host, {"rank_policy": "fifo"})
    assert fifo.run_args == [] and any("starve" in n for n in fifo.notes)
    assert study.cpu_list_arg((1,)) == "1-1" and study.cpu_list_arg((0, 1, 4)) == "0-1,4"


def test_local_points_become_virtual_nodes():
    host = NodeFacts(cpus=(0, 1, 2, 3))
    assert study.local_adjust("p", "lwk", 2, 1, {}, host).run_args == ["--vnodes", "2"]
    over = study.local_adjust("p", "lwk", 2, 2, {}, host)
    assert over.run_args == ["--vnodes", "2", "--oversubscribe"] and over.oversubscribe
    assert study.local_adjust("p", "linux", 1, 4, {}, host).run_args == []
    with pytest.raises(study.StudyError, match="point p does not fit this host: --vnodes 5"):
        study.local_adjust("p", "linux", 5, 1, {}, host)


def test_point_states_of_either_backend_are_one_type(tmp_path):
    (tmp_path / "p.out").write_text("starting\nmckmpi: error: input deck missing\nabort\n")
    failed = study.point_state(tmp_path, {"name": "p", "job_id": None, "local": {
        "exit_code": 3, "log": "p.out"}}, "slurm", None)  # a Slurm plan run on this host
    assert (failed.backend, failed.state, failed.exit_code) == ("local", "FAILED", 3)
    assert failed.final and failed.failed and not failed.ok
    assert failed.detail == "mckmpi: error: input deck missing"
    waiting = study.point_state(tmp_path, {"name": "q", "job_id": None}, "slurm", None)
    assert (waiting.backend, waiting.state, waiting.started) == ("slurm", study.NOT_SUBMITTED,
                                                                 False)
    assert waiting.final and not waiting.failed


SACCT_ENDS = {"11": "COMPLETED|0:0", "12": "CANCELLED by 0|0:15", "13": "TIMEOUT|0:0",
              "14": "NODE_FAIL|0:0", "15": "OUT_OF_MEMORY|0:125", "16": "FAILED|3:0",
              "17": "COMPLETED|0:15"}


def _fake_slurm(bin_dir: Path, ends: dict[str, str]) -> dict[str, str]:
    """scontrol that has forgotten every job and sacct that remembers `ends`, on PATH."""
    bin_dir.mkdir(exist_ok=True)
    cases = "".join(f'  *"-j {job} "*) echo "{end}|n1|p" ;;\n' for job, end in ends.items())
    for name, body in (
            ("scontrol", 'case "$*" in "show job"*) echo "Invalid job id specified" >&2; exit 1;;'
                         ' esac\necho "JobCompType = jobcomp/none"\n'),
            ("sacct", f'case "$*" in\n{cases}esac\n')):
        (bin_dir / name).write_text("#!/bin/sh\n" + body)
        (bin_dir / name).chmod(0o755)
    return job_env(PATH=f"{bin_dir}:{os.environ['PATH']}")


def _manifest(out: Path, jobs: list[str]) -> None:
    out.mkdir()
    study.save(out, {"schema": study.SCHEMA, "schema_version": study.VERSION, "target": "slurm",
                     "points": [{"name": f"p-{j}", "job_id": j, "log": "p-%j.out"}
                                for j in jobs]})


def test_status_tells_the_real_end_and_keeps_it(tmp_path):
    out = tmp_path / "study"
    _manifest(out, list(SACCT_ENDS))
    states = study.status(out, _fake_slurm(tmp_path / "bin", SACCT_ENDS))
    assert [s.ending for s in states] == ["completed", "cancelled, SIGTERM", "timeout", "node-fail",
                                          "out-of-memory, 125", "exit 3", "signal SIGTERM"]
    assert [s.ok for s in states] == [True] + [False] * 6  # 0:15 is a signal, not success
    kept = {p["job_id"]: p["ends"][p["job_id"]] for p in study.load(out)["points"]}
    assert kept["12"] == {"job_id": "12", "state": "CANCELLED", "exit_code": 0, "signal": 15,
                          "ending": "cancelled, SIGTERM"}
    # Accounting forgets too: the end kept in study.json still answers.
    states = study.status(out, _fake_slurm(tmp_path / "bin", {}))
    assert [s.ending for s in states][:3] == ["completed", "cancelled, SIGTERM", "timeout"]


def test_run_args_take_every_section_of_mckmpi_run():
    """--run-args accepts what `mckmpi run` accepts, offload options included, typed."""
    given = study.parse_run_args(["--offload", "none", "--mem", "32M", "--lwk-cores", "1,2",
                                  "--rank-policy", "fifo", "--trace-writer", "gather"])
    assert given == {"offload": "none", "mem": 32 * 2**20, "lwk_cores": (1, 2),
                     "rank_policy": "fifo", "trace_writer": "gather"}
    with pytest.raises(study.StudyError, match="--offload: invalid choice: 'all'"):
        study.parse_run_args(["--offload", "all"])


def test_local_plan_with_offload_run_args(tmp_path):
    out = tmp_path / "s"
    res = mck("study", "plan", "--local", "--app", "fwq", "--nodes", "1", "--ranks-per-node",
              "1", "--run-args", "--offload none", "--out", str(out), env=job_env())
    assert res.returncode == 0, res.stderr
    assert json.loads((out / "study.json").read_text())["request"]["run_args"] == [
        "--offload", "none"]


@pytest.mark.parametrize("argv, message", [
    (["--app", "cg", "--nodes", "1"], "--scaling weak or strong is needed for a cg study"),
    (["--app", "fwq", "--nodes", "1", "--scaling", "weak"], "--scaling is for stencil and cg"),
    (["--app", "fwq", "--nodes", "0,1"], "--nodes wants node counts of at least 1"),
    (["--app", "fwq", "--nodes", "1", "--modes", "lwk,mck"], "--modes wants linux, lwk"),
    (["--app", "fwq", "--nodes", "1", "--run-args", "--mode lwk"], "--mode is set by the plan"),
    (["--app", "fwq", "--nodes", "1", "--run-args=--bogus"], "not options of mckmpi run: --bogus"),
    (["--app", "fwq", "--nodes", "1", "--run-args", "--mem lots"], "--run-args: not a size"),
    (["--app", "fwq", "--nodes", "1", "--sbatch-args", "-N 3"], "-N is set by the plan"),
    (["--app", "fwq", "--nodes", "1"], "no Slurm found: sbatch and scontrol not on PATH"),
    (["--app", "fwq", "--nodes", "4096", "--local"], "point fwq-linux-n4096 does not fit this"),
    (["--app", "fwq", "--nodes", "1", "--app-args", "--quantum-usec 5"],
     "refused by fwq.py: unrecognized arguments: --quantum-usec 5"),
    (["--app", "fwq", "--nodes", "1", "--axis", "app:--samples=10,x"],
     "app arguments '--samples=x' refused by fwq.py: argument --samples"),
    (["--app", "fwq", "--nodes", "1", "--axis", "colour=1,2"], "--axis colour: not an option"),
    (["--app", "fwq", "--nodes", "1", "--axis", "mode=linux,lwk"], "--axis mode: set by the plan"),
    (["--app", "fwq", "--nodes", "1", "--axis", "oversubscribe=yes"], "a switch takes the values"),
    (["--app", "fwq", "--nodes", "1", "--axis", "mem"], "--axis wants NAME=V1,V2"),
    (["--app", "fwq", "--nodes", "1", "--axis", "mem=1G,2G", "--axis", "app:--samples=1,2,3",
      "--combine", "zip"], "--combine zip needs axes with the same number of values"),
    (["--app", "fwq", "--nodes", "1", "--repeats", "0"], "--repeats must be from 1 to 1000, got 0"),
])
def test_bad_plans_are_one_line_and_create_nothing(tmp_path, argv, message):
    env = job_env(PATH=str(tmp_path))  # no Slurm on PATH
    out = tmp_path / "s"
    res = mck("study", "plan", "--ranks-per-node", "1", "--out", str(out), *argv, env=env)
    assert res.returncode == 2, res.stdout + res.stderr
    assert message in res.stderr and res.stderr.count("\n") == 1
    assert not out.exists()


def test_local_study_run_then_collect(tmp_path):
    out = tmp_path / "cg"
    env = job_env()
    res = mck("study", "plan", "--local", "--app", "cg", "--nodes", "1,2", "--ranks-per-node",
              "1", "--scaling", "strong", "--size", "8", "--run-args", "--mem 32M",
              "--out", str(out), env=env)
    assert res.returncode == 0, res.stderr
    assert "next: mckmpi study run" in res.stdout
    res = mck("study", "run", str(out), env=env, timeout=90)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("[1/4] cg-strong-linux-n1: 1 ranks on 1 virtual node, linux")
    assert sum("completed in" in ln for ln in lines) == 4
    manifest = json.loads((out / "study.json").read_text())
    assert [p["local"][0]["exit_code"] for p in manifest["points"]] == [0, 0, 0, 0]
    with open_run(out / "runs" / "cg-strong-lwk-n2-local.h5") as r:
        assert (r.attrs["mode"], r.attrs["nnodes"], r.attrs["vnodes"]) == ("lwk", 2, 2)
    res = mck("study", "collect", str(out), "-o", str(tmp_path / "cg.h5"), env=env)
    assert res.returncode == 0, res.stderr
    runs = study_file.read(tmp_path / "cg.h5")
    assert sorted((r["mode"].decode(), int(r["nodes"])) for r in runs) == [
        ("linux", 1), ("linux", 2), ("lwk", 1), ("lwk", 2)]
    assert all(r["verified"] == 1 and r["scaling"] == b"strong" for r in runs)
    status = mck("study", "status", str(out), env=env)
    assert status.returncode == 0 and status.stdout.count(" local ") == 4 and status.stdout.count("COMPLETED") == 4
    # A local plan is not for Slurm: submitting it says so and submits nothing.
    sub = mck("study", "submit", str(out), env=env)
    assert sub.returncode == 2 and "planned with --local" in sub.stderr


# --- a real Slurm ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if not HAVE_SLURM:
        pytest.skip("Slurm (slurm-wlm) and munge are not installed")
    cluster_dir = tmp_path_factory.mktemp("slurm")
    try:
        up = run([SLURM_UP, "--dir", cluster_dir, "--nodes", "2", "--cpus", "2",
                  "--core-spec", "1", "--timeout", "30"])
        assert up.returncode == 0, up.stdout + up.stderr
        yield cluster_dir, job_env(SLURM_CONF=str(cluster_dir / "slurm.conf"))
    finally:
        down = run([SLURM_DOWN, "--dir", cluster_dir, "--grace", "5"], timeout=60)
        assert down.returncode == 0, down.stdout + down.stderr


def plan(env: dict[str, str], out: Path, *argv: str) -> dict:
    res = mck("study", "plan", "--out", str(out), *argv, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    return json.loads((out / "study.json").read_text())


def submit_and_wait(env: dict[str, str], out: Path,
                    timeout: float = 60) -> subprocess.CompletedProcess[str]:
    res = mck("study", "submit", str(out), env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    return mck("study", "status", str(out), "--wait", str(timeout), env=env, timeout=timeout + 30)


@pytest.mark.slurm
def test_cluster_facts_include_specialised_cores(cluster):
    _, env = cluster
    facts = study.probe_cluster(None, env)
    assert facts.partition == "mckmpi" and [n.name for n in facts.nodes] == ["n1", "n2"]
    assert facts.spec_cpus == (1,) and facts.usable_cpus == 1 and facts.allow_spec_usage
    assert facts.shared_hosts and "pmix" in facts.mpi_plugins


@pytest.mark.slurm
def test_noise_survey_job_of_two_ranks_uses_the_specialised_core(cluster, tmp_path):
    _, env = cluster
    out = tmp_path / "noise"
    manifest = plan(env, out, "--app", "fwq", "--nodes", "2", "--ranks-per-node", "1",
                    "--modes", "lwk", "--size", "200", "--app-args", "--quantum-us 100",
                    "--run-args", "--mem 32M")
    (point,) = manifest["points"]
    assert point["slurm"]["sbatch"] == ["--core-spec=0"]
    script = (out / point["script"]).read_text()
    assert "#SBATCH --core-spec=0" in script and "--linux-cores 1-1" in script
    status = submit_and_wait(env, out)
    assert status.returncode == 0, status.stdout + status.stderr
    job = json.loads((out / "study.json").read_text())["points"][0]["job_id"]
    assert status_rows(status.stdout)["fwq-lwk-n2"][:3] == [job, "COMPLETED", "0"]
    (path,) = (out / "runs").glob(f"fwq-lwk-*job{job}.0-*.h5")  # cluster and suffix in the name
    with open_run(path) as r:
        assert (r.attrs["launcher"], r.attrs["nnodes"], r.attrs["world_size"]) == ("slurm", 2, 2)
        assert r.attrs["slurm_job_id"] == job
        assert sorted(r.provenance["hosts"]) == ["n1", "n2"]
        plans = r.provenance["node_plans"]
        assert all(p.startswith("lwk: linux cpus 1, lwk cpus 0") for p in plans), plans


@pytest.mark.slurm
def test_plan_submit_status_collect_round_trip(cluster, tmp_path):
    _, env = cluster
    out = tmp_path / "stencil"
    manifest = plan(env, out, "--app", "stencil", "--nodes", "1,2", "--ranks-per-node", "1",
                    *TINY_STENCIL, "--run-args", "--mem 32M")
    assert [p["name"] for p in manifest["points"]] == [
        "stencil-weak-linux-n1", "stencil-weak-linux-n2", "stencil-weak-lwk-n1",
        "stencil-weak-lwk-n2"]
    assert manifest["cluster"]["mpi"] == "pmix" and manifest["cluster"]["spec_cpus"] == "1"
    status = submit_and_wait(env, out)
    assert status.returncode == 0, status.stdout + status.stderr
    jobs = [p["job_id"] for p in json.loads((out / "study.json").read_text())["points"]]
    rows = status_rows(status.stdout)
    assert [rows[p["name"]][:3] for p in manifest["points"]] == [
        [job, "COMPLETED", "0"] for job in jobs]
    assert len(set(jobs)) == 4 and all(jobs)
    names = sorted(re.sub(r"-[0-9a-f]{6}\.h5$", ".h5", p.name) for p in (out / "runs").glob("*.h5"))
    assert names == sorted([f"stencil-linux-mckmpi-job{jobs[0]}.0.h5",
                            f"stencil-linux-mckmpi-job{jobs[1]}.0.h5",
                            f"stencil-lwk-mckmpi-job{jobs[2]}.0.h5",
                            f"stencil-lwk-mckmpi-job{jobs[3]}.0.h5"])
    again = mck("study", "submit", str(out), env=env)
    assert again.returncode == 0 and "already submitted" in again.stdout
    res = mck("study", "collect", str(out), "-o", str(tmp_path / "s.h5"), env=env)
    assert res.returncode == 0, res.stderr
    runs = study_file.read(tmp_path / "s.h5")
    assert sorted((r["mode"].decode(), int(r["nodes"]), r["slurm_job_id"].decode()) for r in runs) \
        == sorted(zip(["linux", "linux", "lwk", "lwk"], [1, 2, 1, 2], jobs, strict=True))
    assert all(r["verified"] == 1 for r in runs)


@pytest.mark.slurm
def test_failed_job_is_reported_with_exit_code_and_log(cluster, tmp_path):
    _, env = cluster
    out = tmp_path / "bad"
    plan(env, out, "--app", "fwq", "--nodes", "1", "--ranks-per-node", "1", "--modes", "linux",
         "--app-args", "--quantum-us 1")
    status = submit_and_wait(env, out)
    assert status.returncode == 1
    point = json.loads((out / "study.json").read_text())["points"][0]
    log = out / "logs" / f"fwq-linux-n1-{point['job_id']}.out"
    row = status_rows(status.stdout)["fwq-linux-n1"]
    assert row[:6] == [point["job_id"], "FAILED", "2", "exit", "2", str(log)]
    assert " ".join(row[6:]).startswith("fwq: error: --quantum-us 1 ")  # the cause, not srun's
    assert "1 failed: fwq-linux-n1" in status.stdout


@pytest.mark.slurm
def test_retry_failed_submits_exactly_the_points_that_did_not_complete(cluster, tmp_path):
    _, env = cluster
    out = tmp_path / "retry"
    manifest = plan(env, out, "--app", "fwq", "--nodes", "1,2", "--ranks-per-node", "1",
                    "--modes", "linux", "--size", "30000", "--app-args", "--quantum-us 100")
    res = mck("study", "submit", str(out), env=env)
    assert res.returncode == 0, res.stderr
    first = [p["job_id"] for p in json.loads((out / "study.json").read_text())["points"]]
    assert subprocess.run(["scancel", first[1]], env=env, timeout=30).returncode == 0
    status = mck("study", "status", str(out), "--wait", "60", env=env, timeout=90)
    assert status.returncode == 1 and "--retry failed" in status.stdout
    rows = status_rows(status.stdout)
    assert rows[manifest["points"][0]["name"]][1:4] == ["COMPLETED", "0", "completed"]
    assert rows[manifest["points"][1]["name"]][1] == "CANCELLED"
    res = mck("study", "submit", "--retry", "failed", str(out), env=env)
    assert res.returncode == 0 and "1 job submitted" in res.stdout, res.stdout + res.stderr
    points = json.loads((out / "study.json").read_text())["points"]
    assert points[0]["job_id"] == first[0] and "attempts" not in points[0]
    assert points[1]["job_id"] not in (None, first[1])
    assert [(a["job_id"], a["end"]["state"]) for a in points[1]["attempts"]] == [
        (first[1], "CANCELLED")]
    status = mck("study", "status", str(out), "--wait", "60", env=env, timeout=90)
    assert status.returncode == 0, status.stdout + status.stderr


@pytest.mark.slurm
@pytest.mark.parametrize("argv, message", [
    (["--ranks-per-node", "2"], "--ranks-per-node 2 exceeds the 1 CPUs per node (2 minus "
                                "specialised cores) that partition mckmpi (n[1-2]) gives a job"),
    (["--ranks-per-node", "1", "--nodes", "3"], "--nodes 3 exceeds the 2 nodes of partition"),
    (["--ranks-per-node", "1", "--partition", "gpu"], "unknown Slurm partition 'gpu' (known: "
                                                      "mckmpi)"),
    (["--ranks-per-node", "1", "--mpi", "pmi5"], "--mpi pmi5: this Slurm offers"),
])
def test_plans_that_do_not_fit_the_cluster(cluster, tmp_path, argv, message):
    _, env = cluster
    out = tmp_path / "s"
    args = ["--app", "fwq", "--nodes", "1", *argv]
    res = mck("study", "plan", "--out", str(out), *args, env=env)
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert res.stderr.count("\n") == 1 and not out.exists()


@pytest.mark.slurm
def test_submit_checks_the_cluster_again(cluster, tmp_path):
    _, env = cluster
    out = tmp_path / "s"
    plan(env, out, "--app", "fwq", "--nodes", "1", "--ranks-per-node", "1", "--modes", "linux")
    gone = {**env, "SLURM_CONF": str(tmp_path / "missing.conf")}
    res = mck("study", "submit", str(out), env=gone)
    assert res.returncode == 2 and "no Slurm found: SLURM_CONF names a missing" in res.stderr
    assert json.loads((out / "study.json").read_text())["points"][0]["job_id"] is None


@pytest.mark.slurm
def test_two_node_study_with_repeats_axes_arrays_gates_and_plots(cluster, tmp_path):
    """A 2-node study, 3 repeats, two axes zipped, as job arrays over pmix; provenance in
    every run file; collected, gated by a passing and a failing reference, plotted."""
    cluster_dir, env = cluster
    out = tmp_path / "st"
    manifest = plan(env, out, "--app", "stencil", "--nodes", "1,2", "--ranks-per-node", "1",
                    "--scaling", "weak", "--size", "16", "--modes", "linux", "--repeats", "3",
                    "--axis", "app:--iterations=4,6", "--axis", "mem=32M,64M",
                    "--combine", "zip", "--app-args", "--warmup 1",
                    "--sbatch-args", "--comment=mckmpi-test")
    names = [p["name"] for p in manifest["points"]]
    assert names == ["stencil-weak-linux-n1-iterations4-mem32M",
                     "stencil-weak-linux-n2-iterations4-mem32M",
                     "stencil-weak-linux-n1-iterations6-mem64M",
                     "stencil-weak-linux-n2-iterations6-mem64M"]
    assert [len(j["tasks"]) for j in manifest["jobs"]] == [6, 6]  # one array per shape
    two = manifest["points"][1]
    assert any("share host(s) vm" in n or "share host(s)" in n for n in two["notes"])
    script = (out / two["script"]).read_text()
    assert "#SBATCH --array=0-5" in script and "--mpi=pmix" in script
    assert "#SBATCH --comment=mckmpi-test" in script
    # n1 and n2 are one host: their ranks share CPUs, so they must not busy-poll.
    assert "export OMPI_MCA_mpi_yield_when_idle=1" in script
    assert "yield_when_idle" not in (out / manifest["points"][0]["script"]).read_text()
    status = mck("study", "submit", str(out), env=env)
    assert status.returncode == 0, status.stderr
    status = mck("study", "status", str(out), "--wait", "240", env=env, timeout=300)
    assert status.returncode == 0, status.stdout + status.stderr
    progress = [ln for ln in status.stdout.splitlines() if ln.startswith("[")]
    assert progress and progress[-1].endswith("] 12 COMPLETED")  # said while waiting
    rows = status_rows(status.stdout)
    assert rows[f"{names[3]}#2"][1] == "COMPLETED" and "_" in rows[f"{names[3]}#2"][0]
    files = sorted((out / "runs").glob("*.h5"))
    assert len(files) == 12
    with open_run(next(f for f in files if "stencil" in f.name)) as r:
        p = r.provenance
        assert p["slurm_array_job_id"] and p["slurm_array_task_id"].isdigit()
        assert p["slurm_step_id"] == "0" and p["slurm_cluster"] == "mckmpi"
        assert p["slurm_partition"] == "mckmpi" and p["slurm_version"].startswith("slurm")
        assert p["study_point"] in names and p["study_repeat"] in ("0", "1", "2")
        assert p["source_commit"] and len(p["app_sha256"]) == 64
        assert any(e.startswith("SLURM_JOB_ID=") for e in p["environment"])
    two_node = [f for f in files if open_run(f).attrs["nnodes"] == 2]
    with open_run(two_node[0]) as r:
        p = r.provenance
        assert p["node_name"] == ["n1", "n2"] and len(set(p["node_hostname"])) == 1
        assert p["shared_hosts"] and p["slurm_step_nodelist"] == "n[1-2]"
    res = mck("study", "collect", str(out), "-o", str(out / "study.h5"), env=env)
    assert res.returncode == 0, res.stderr
    pts = study_points(out / "study.h5")
    assert set(pts["n"]) == {3}

    def median(point: str) -> float:
        sel = pts[(pts["point"] == point.encode()) & (pts["metric"] == b"iter_us")]
        return float(sel["median"][0])

    # Passing: the 2-node point within a wide band. Failing on purpose: the 1-rank point
    # (no messages, so its repeats agree) against a reference 10x faster, +-50%.
    ok, bad = tmp_path / "ok.toml", tmp_path / "bad.toml"
    for path, point, value, band in ((ok, names[3], median(names[3]), (-0.9, 9.0)),
                                     (bad, names[0], median(names[0]) / 10, (-0.5, 0.5))):
        path.write_text(f'system = "mckmpi"\napp = "stencil"\n[all]\n'
                        f'verified = {{ value = 1, tolerance = 0 }}\n'
                        f'[points."{point}"]\n'
                        f'iter_us = {{ value = {value}, lower = {band[0]}, upper = {band[1]} }}\n')
    passed = mck("check", str(out / "study.h5"), "--reference", str(ok), env=env)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    failed = mck("check", str(out), "--reference", str(bad), env=env)
    assert failed.returncode == 1 and f"1 fail: {names[0]} iter_us" in failed.stdout
    plot = mck("study", "plot", str(out / "study.h5"), "--plots", str(out / "plots"), env=env)
    assert plot.returncode == 0, plot.stderr
    assert len(list((out / "plots").glob("scaling-stencil-weak-*.png"))) == 2


def study_points(path: Path):
    from mckmpi.analysis import study as analysis_study

    return analysis_study.read_points(path)


@pytest.mark.slurm
def test_core_spec_and_map_cpu_by_hand(cluster, tmp_path):
    """srun --core-spec/--thread-spec by hand: the specialised CPU is the Linux core, never
    the rank's; an explicit map_cpu names the LWK cores and says so."""
    _, env = cluster
    spec = "Slurm's specialised CPUs 1 (CPUSpecList of n"
    for opt, note in (("--core-spec=0", spec), ("--core-spec=1", spec), ("--thread-spec=1", spec),
                      ("--cpu-bind=map_cpu:0", "srun --cpu-bind=map_cpu:0: those are the LWK "
                                               "cores")):
        path = tmp_path / f"{opt[2:].replace('=', '-').replace(':', '-')}.h5"
        res = run(["srun", "-N", "1", "-n", "1", "--mpi=pmix", opt, sys.executable, "-m",
                   "mckmpi", "run", "--mode", "lwk", "--mem", "32M", "--offload", "none",
                   "--out", path, "--", ROOT / "apps" / "fwq.py", "--samples", "50"],
                  env=env, cwd=tmp_path, timeout=120)
        assert res.returncode == 0, res.stderr
        assert note in res.stderr
        with open_run(path) as r:
            assert r.provenance["node_plans"] == ["lwk: linux cpus 1, lwk cpus 0, 1 rank, "
                                                  "mem/rank 32M"]
            assert r.ranks["cpus"][0] == b"0"


def test_axes_cross_and_zip_and_derived_names():
    mem, size = study.parse_axis("mem=256M,1G"), study.parse_axis("app:--size=1024,2048")
    assert (mem.target, mem.option, mem.values) == ("run", "--mem", ("256M", "1G"))
    assert (size.target, size.option, size.label) == ("app", "--size", "size")
    assert study.axis_points([mem, size], "cross") == [
        ("256M", "1024"), ("256M", "2048"), ("1G", "1024"), ("1G", "2048")]
    assert study.axis_points([mem, size], "zip") == [("256M", "1024"), ("1G", "2048")]
    assert study.axis_suffix([mem, size], ("256M", "1024")) == "mem256M-size1024"
    assert study.axis_text([mem, size], ("256M", "1024")) == "mem=256M app:--size=1024"
    over = study.parse_axis("oversubscribe=on,off")
    assert over.switch and over.args("on") == ["--oversubscribe"] and over.args("off") == []
    assert study.axis_points([], "cross") == [()]


def test_sbatch_args_take_a_lone_dashed_option(tmp_path):
    from mckmpi.frontend.cli import glue_command_lines

    assert glue_command_lines(["study", "plan", "--sbatch-args", "--account=proj42", "--run-args",
                               "--mem 1G", "--", "--sbatch-args", "x"]) == [
        "study", "plan", "--sbatch-args=--account=proj42", "--run-args=--mem 1G", "--",
        "--sbatch-args", "x"]
    out = tmp_path / "s"
    res = mck("study", "plan", "--local", "--app", "fwq", "--nodes", "1", "--ranks-per-node", "1",
              "--sbatch-args", "--account=proj42", "--out", str(out), env=job_env())
    assert res.returncode == 0, res.stderr
    assert json.loads((out / "study.json").read_text())["request"]["sbatch_args"] == [
        "--account=proj42"]


def test_local_study_with_repeats_and_an_axis(tmp_path):
    out = tmp_path / "fwq"
    env = job_env()
    res = mck("study", "plan", "--local", "--app", "fwq", "--nodes", "1", "--ranks-per-node", "1",
              "--modes", "linux", "--repeats", "2", "--axis", "app:--samples=40,60",
              "--app-args", "--quantum-us 200", "--out", str(out), env=env)
    assert res.returncode == 0, res.stderr
    res = mck("study", "run", str(out), env=env, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.splitlines()[0].startswith("[1/4] fwq-linux-n1-samples40#0: 1 ranks")
    names = sorted(p.name for p in (out / "runs").glob("*.h5"))
    assert names == ["fwq-linux-n1-samples40-r0-local.h5", "fwq-linux-n1-samples40-r1-local.h5",
                     "fwq-linux-n1-samples60-r0-local.h5", "fwq-linux-n1-samples60-r1-local.h5"]
    with open_run(out / "runs" / names[3]) as r:
        p = r.provenance
        assert (p["study_point"], p["study_repeat"]) == ("fwq-linux-n1-samples60", "1")
        assert p["study_axes"] == "app:--samples=60" and r["noise/fwq_ns"].shape == (1, 60)
    status = mck("study", "status", str(out), env=env)
    assert status.stdout.count(" local ") == 4 and status.stdout.count("COMPLETED") == 4
    res = mck("study", "collect", str(out), "-o", str(out / "study.h5"), env=env)
    assert res.returncode == 0, res.stderr
    from mckmpi.analysis import study as analysis_study

    pts = analysis_study.read_points(out / "study.h5")
    p99 = pts[pts["metric"] == b"fwq_p999_us"]
    assert sorted(p99["point"].tolist()) == [b"fwq-linux-n1-samples40", b"fwq-linux-n1-samples60"]
    assert set(p99["n"]) == {2}
    plot = mck("study", "plot", str(out / "study.h5"), "--plots", str(out / "plots"), env=env)
    assert plot.returncode == 0 and (out / "plots" / "survey-fwq.png").is_file(), plot.stdout


@pytest.mark.slurm
def test_an_mpi_executable_under_srun_leaves_a_run_file(cluster, tmp_path):
    _, env = cluster
    src = tmp_path / "hello.c"
    src.write_text("#include <mpi.h>\n#include <stdio.h>\nint main(int c, char **v) { int r;"
                   " MPI_Init(&c, &v); MPI_Comm_rank(MPI_COMM_WORLD, &r); printf(\"HELLO %d\\n\","
                   " r); MPI_Finalize(); return 0; }\n")
    subprocess.run(["mpicc", "-o", str(tmp_path / "hello"), str(src)], check=True, timeout=60)
    res = run(["srun", "-N", "2", "-n", "2", "--mpi=pmix", sys.executable, "-m", "mckmpi", "run",
               "--out", tmp_path / "runs", "--", "./hello"], env=env, cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr
    assert sorted(ln for ln in res.stdout.splitlines() if ln.startswith("HELLO")) == [
        "HELLO 0", "HELLO 1"]
    assert "share one machine" in res.stderr and "not measured" in res.stderr
    (path,) = (tmp_path / "runs").glob("hello-linux-job*.0.h5")
    with open_run(path) as r:
        assert r.attrs["launcher"] == "slurm" and r.attrs["nnodes"] == 2
        assert list(r.ranks["node"]) == [0, 1] and list(r.ranks["host"]) == [b"n1", b"n2"]
        assert r.read("app/exit_code").tolist() == [0, 0]
        assert r.provenance["slurm_step_nodelist"] == "n[1-2]" and r.provenance["shared_hosts"]


@pytest.mark.slurm
def _wait_idle(env: dict[str, str], seconds: float = 90) -> None:
    """Until no job of an earlier test holds the nodes (a step that needs both nodes would
    otherwise wait in the queue for them)."""
    deadline = time.monotonic() + seconds
    while run(["squeue", "-h"], env=env).stdout.strip() and time.monotonic() < deadline:
        time.sleep(1)


@pytest.mark.timeout(300)
def test_a_heterogeneous_step_records_its_components(cluster, tmp_path):
    _, env = cluster
    _wait_idle(env)
    path = tmp_path / "het.h5"
    rank = [sys.executable, "-m", "mckmpi", "run", "--out", path, "--", ROOT / "apps" / "fwq.py",
            "--samples", "30"]
    res = run(["srun", "--mpi=pmix", "-N1", "-n1", *rank, ":", "-N1", "-n1", *rank], env=env,
              cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr
    with open_run(path) as r:
        p = r.provenance
        assert (p["slurm_het_size"], p["slurm_het_component"]) == ("2", "0")
        assert p["slurm_het_job_id"] == r.attrs["slurm_job_id"]
        assert p["slurm_het_nodelists"] == "0:n1 1:n2"


def test_status_asks_the_controller_once_for_all_jobs(tmp_path):
    """One `scontrol show job` per status, whatever the number of points and array tasks;
    a pending array's single record covers its tasks."""
    calls = tmp_path / "calls"
    fake = tmp_path / "bin" / "scontrol"
    fake.parent.mkdir()
    fake.write_text(f"""#!/bin/sh
echo "$*" >> {calls}
echo "JobId=7 ArrayJobId=7 ArrayTaskId=1-2 JobName=a JobState=PENDING Reason=Resources"
echo "JobId=8 ArrayJobId=7 ArrayTaskId=0 JobName=a JobState=COMPLETED ExitCode=0:0 StdOut=/x"
echo "JobId=9 JobName=b JobState=RUNNING Reason=None"
""")
    fake.chmod(0o755)
    env = {"PATH": f"{fake.parent}:{os.environ['PATH']}"}
    states = slurm.job_states(["7_0", "7_1", "7_2", "9"], env)
    assert {k: v["state"] for k, v in states.items()} == {
        "7_0": "COMPLETED", "7_1": "PENDING", "7_2": "PENDING", "9": "RUNNING"}
    assert calls.read_text().splitlines() == ["show job -o"]
    manifest = {"schema": study.SCHEMA, "schema_version": study.VERSION, "target": "slurm",
                "points": [{"name": "a", "repeats": 3, "tasks": ["7_0", "7_1", "7_2"],
                            "job_id": "7", "log": "logs/a-%A_%a.out"},
                           {"name": "b", "repeats": 1, "tasks": ["9"], "job_id": "9",
                            "log": "logs/b-%j.out"}]}
    (tmp_path / "study.json").write_text(json.dumps(manifest))
    calls.unlink()
    rows = study.status(tmp_path, env)
    assert [(s.name, s.job_id, s.state) for s in rows] == [
        ("a#0", "7_0", "COMPLETED"), ("a#1", "7_1", "PENDING"), ("a#2", "7_2", "PENDING"),
        ("b", "9", "RUNNING")]
    assert rows[1].log == str(tmp_path / "logs/a-7_1.out")
    assert calls.read_text().splitlines() == ["show job -o"]
    assert study.progress(rows) == "2 PENDING, 1 COMPLETED, 1 RUNNING"
