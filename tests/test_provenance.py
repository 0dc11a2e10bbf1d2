"""Provenance facts (mckmpi.provenance) from made-up /proc and /sys trees, and their report."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

from mckmpi import provenance as prov
from mckmpi.analysis.report import provenance_lines
from mckmpi.trace.tracer import Tracer

ROOT = Path(__file__).resolve().parents[1]


def fake_node(tmp: Path, cmdline: str, isolated: str = "", model: str = "Xeon X") -> tuple[Path, Path]:
    proc, sysfs = tmp / "proc", tmp / "sys"
    (proc / "sys/kernel").mkdir(parents=True)
    (proc / "cmdline").write_text(cmdline + "\n")
    (proc / "cpuinfo").write_text(f"processor\t: 0\nmodel name\t: {model}\n\nprocessor\t: 1\n"
                                  f"model name\t: {model}\n")
    (proc / "sys/kernel/sched_rt_runtime_us").write_text("950000\n")
    cpu = sysfs / "devices/system/cpu"
    (cpu / "cpu0/cpufreq").mkdir(parents=True)
    (cpu / "isolated").write_text(isolated + "\n")
    (cpu / "nohz_full").write_text("(null)\n" if not isolated else isolated + "\n")
    (cpu / "cpu0/cpufreq/scaling_governor").write_text("performance\n")
    (sysfs / "kernel/mm/transparent_hugepage").mkdir(parents=True)
    (sysfs / "kernel/mm/transparent_hugepage/enabled").write_text("always [madvise] never\n")
    return proc, sysfs


def test_node_facts_read_cpu_model_cmdline_and_isolation(tmp_path):
    proc, sysfs = fake_node(tmp_path, "ro quiet isolcpus=2-3 nohz_full=2-3 rcu_nocbs=2-3",
                            isolated="2-3")
    n = prov.node_facts("n1", proc, sysfs, hostname="box")
    assert (n.name, n.hostname, n.cpu_model) == ("n1", "box", "Xeon X")
    assert n.kernel_cmdline == "ro quiet isolcpus=2-3 nohz_full=2-3 rcu_nocbs=2-3"
    assert "isolated=2-3" in n.isolation and "nohz_full=2-3" in n.isolation
    assert "params=isolcpus=2-3,nohz_full=2-3,rcu_nocbs=2-3" in n.isolation
    assert "governor=performance" in n.isolation and "thp=madvise" in n.isolation
    assert "sched_rt_runtime_us=950000" in n.isolation


def test_node_without_isolation_or_sysfs_says_none(tmp_path):
    n = prov.node_facts("n1", tmp_path / "noproc", tmp_path / "nosys", hostname="h")
    assert n.cpu_model == "unknown" and n.kernel_cmdline == ""
    assert n.isolation.startswith("isolated=none nohz_full=none params=none governor=none thp=unavailable")


def test_arm_cpuinfo_names_implementer_and_part(tmp_path):
    (tmp_path / "cpuinfo").write_text("processor\t: 0\nCPU implementer\t: 0x41\nCPU part\t: 0xd0c\n")
    assert prov.cpu_model(tmp_path) == "implementer 0x41 part 0xd0c"


def test_environment_keeps_launcher_variables_and_withholds_secrets():
    env = {"SLURM_JOB_ID": "7", "OMPI_MCA_btl": "self", "MCKMPI_MODE": "lwk", "HOME": "/root",
           "SLURM_JWT": "abc", "PMIX_SECRET_KEY": "x", "PATH": "/bin", "PMIX_RANK": "0"}
    assert prov.launch_environment(env) == [
        "MCKMPI_MODE=lwk", "OMPI_MCA_btl=self", "PMIX_RANK=0", "PMIX_SECRET_KEY=(withheld)",
        "SLURM_JOB_ID=7", "SLURM_JWT=(withheld)"]


def test_slurm_facts_of_an_array_task_and_a_het_component():
    env = {"SLURM_JOB_ID": "43", "SLURM_STEP_ID": "0", "SLURM_ARRAY_JOB_ID": "40",
           "SLURM_ARRAY_TASK_ID": "3", "SLURM_CLUSTER_NAME": "c", "SLURM_JOB_PARTITION": "p",
           "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_JOB_ID_HET_GROUP_0": "42",
           "SLURM_JOB_ID_HET_GROUP_1": "43", "SLURM_HET_SIZE": "2"}
    f = prov.slurm_facts(env, "slurm 22.05.8")
    assert f["slurm_step_id"] == "0"
    assert (f["slurm_array_job_id"], f["slurm_array_task_id"]) == ("40", "3")
    assert (f["slurm_het_component"], f["slurm_het_size"]) == ("1", "2")
    assert (f["slurm_cluster"], f["slurm_partition"]) == ("c", "p")
    assert f["slurm_step_nodelist"] == "n[1-2]" and f["slurm_version"] == "slurm 22.05.8"
    assert all(v == "" for v in prov.slurm_facts({}).values())
    # Slurm 22.05's srun exports the components of a het step as *_PACK_GROUP_<n>; rank 0's
    # job record is component 0, the het job's id.
    het = prov.slurm_facts({"SLURM_JOB_ID": "8", "SLURM_JOB_ID_PACK_GROUP_0": "8",
                            "SLURM_JOB_ID_PACK_GROUP_1": "9", "SLURM_PACK_SIZE": "2",
                            "SLURM_JOB_NODELIST_PACK_GROUP_0": "n1",
                            "SLURM_JOB_NODELIST_PACK_GROUP_1": "n2"})
    assert (het["slurm_het_job_id"], het["slurm_het_component"], het["slurm_het_size"]) == (
        "8", "0", "2")
    assert het["slurm_het_nodelists"] == "0:n1 1:n2"


def test_app_hash_and_source_commit(tmp_path):
    app = tmp_path / "app.py"
    app.write_bytes(b"print(1)\n")
    facts = prov.job_facts({}, "file", str(app), ["mckmpi", "run", "--", str(app)])
    assert facts["app_sha256"] == hashlib.sha256(b"print(1)\n").hexdigest()
    assert facts["launch_command"] == f"mckmpi run -- {app}"
    assert facts["slurm_version"] == ""  # not in a Slurm job: srun is not asked
    module = prov.app_file("module", "json")
    assert module.endswith("json/__init__.py")
    if (ROOT / ".git").exists():
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        assert prov.source_commit(ROOT).split("+")[0] == head
    assert prov.source_commit(tmp_path) == ""


def test_record_and_report_say_when_nodes_share_a_host(capsys):
    nodes = [prov.NodeProvenance("n1", "box", "Xeon", "ro", "isolated=none"),
             prov.NodeProvenance("n2", "box", "Xeon", "ro", "isolated=none")]
    t = Tracer()
    job = {**prov.slurm_facts({"SLURM_JOB_ID": "5", "SLURM_STEP_ID": "0"}), "source_commit": "abc",
           "launch_command": "mckmpi run -- a.py", "environment": ["MCKMPI_MODE=lwk"]}
    prov.record(t, job, nodes)
    assert prov.shared_hosts_note(nodes) == (
        "nodes n1, n2 on box share one machine: their CPUs, noise and timings are not "
        "independent (provenance shared_hosts)")
    attrs = t.group_attrs["provenance"]
    assert attrs["shared_hosts"] is True
    assert attrs["node_hostname"] == ["box", "box"] and attrs["node_name"] == ["n1", "n2"]
    assert prov.nodes_of(attrs) == nodes
    text = "\n".join(provenance_lines(attrs))
    assert "job 5 step 0" in text and "commit abc" in text and "MCKMPI_MODE=lwk" in text
    assert "2 nodes on 1 host (box)" in text
    apart = [prov.NodeProvenance("n1", "a", "", "", ""), prov.NodeProvenance("n2", "b", "", "", "")]
    assert not prov.shared_hosts(apart) and prov.shared_hosts_note(apart) == ""
    assert "mckmpi: note: nodes n1, n2 on box share one machine" in capsys.readouterr().err
    assert provenance_lines({}) == []


def test_parent_command_reads_the_parent(tmp_path):
    (tmp_path / "12").mkdir()
    (tmp_path / "12" / "cmdline").write_bytes(b"mpiexec\0-n\x002\0python\0")
    assert prov.parent_command(12, tmp_path) == "mpiexec -n 2 python"
