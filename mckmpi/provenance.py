"""Where and how a job ran: the facts of a run file's /provenance group.

A number is only worth keeping if one can tell where it came from. Beyond the versions
(`mckmpi.info.versions`), a run file records the Slurm step it was (job, step, array and
heterogeneous-job ids, cluster, partition, Slurm version, the step's node list), every
node's real host name, CPU model, kernel command line and isolation settings (two Slurm
nodes on one host say so), the launch command line, the launcher's environment
(MCKMPI_*, OMPI_*, SLURM_*; values of names that look like secrets are withheld), the
source's version and git commit, and a hash of the app.

Everything here reads files and the environment handed in (the roots are parameters), so
it is tested against made-up /proc and /sys trees; `record` puts the facts into a tracer.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mckmpi.node.host import sysfs_choice

if TYPE_CHECKING:
    from mckmpi.trace.tracer import Tracer

#: The environment a run depends on, recorded as NAME=value lines.
ENV_PREFIXES = ("MCKMPI_", "OMPI_", "PMIX_", "SLURM_", "SLURMD_")
#: Names whose values are never written to a file.
_SECRET = re.compile(r"TOKEN|JWT|SECRET|PASSW|CREDENTIAL|(^|_)KEY($|_)", re.IGNORECASE)
#: Kernel parameters that decide how quiet a core is.
ISOLATION_PARAMS = ("isolcpus", "nohz_full", "nohz", "rcu_nocbs", "rcu_nocb_poll",
                    "irqaffinity", "housekeeping", "skew_tick", "nosoftlockup", "nmi_watchdog",
                    "idle", "intel_idle.max_cstate", "processor.max_cstate", "intel_pstate",
                    "mitigations", "transparent_hugepage", "threadirqs", "tsc", "audit")
#: Bytes hashed per read of the app file.
_HASH_BLOCK = 1 << 20
#: Seconds a helper command (git, srun --version) may take.
_COMMAND_TIMEOUT = 5.0
#: The source tree mckmpi runs from (a git checkout in development).
SOURCE_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class NodeProvenance:
    """One node of the job as its node-local rank 0 sees it."""

    name: str          # the launcher's node name (SLURMD_NODENAME, or the host)
    hostname: str      # the machine's own name: two Slurm nodes on one host share it
    cpu_model: str
    kernel_cmdline: str
    isolation: str     # isolated/nohz_full CPUs, the kernel's isolation parameters, governor


def read_text(path: Path) -> str:
    """A small system file's text, '' when it is absent or unreadable."""
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return ""


def cpu_model(proc: Path = Path("/proc")) -> str:
    """The CPU's model name from cpuinfo (x86 'model name', else arm64's implementer/part)."""
    info = read_text(proc / "cpuinfo")
    found: dict[str, str] = {}
    for line in info.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            found.setdefault(key.strip().lower(), value.strip())
    if found.get("model name"):
        return found["model name"]
    if "cpu part" in found:
        return f"implementer {found.get('cpu implementer', '?')} part {found['cpu part']}"
    return found.get("model") or found.get("cpu") or "unknown"


def isolation(cmdline: str, sysfs: Path = Path("/sys"), proc: Path = Path("/proc")) -> str:
    """How the kernel sets cores apart, in one line: isolated and nohz_full CPUs (sysfs), the
    isolation parameters of the command line, cpu0's frequency governor, THP, RT throttling."""
    cpu = sysfs / "devices/system/cpu"
    parts = [f"isolated={read_text(cpu / 'isolated') or 'none'}",
             f"nohz_full={read_text(cpu / 'nohz_full') or 'none'}"]
    params = [w for w in cmdline.split() if w.split("=", 1)[0] in ISOLATION_PARAMS]
    parts.append(f"params={','.join(params) if params else 'none'}")
    governor = read_text(cpu / "cpu0/cpufreq/scaling_governor")
    parts.append(f"governor={governor or 'none'}")
    parts.append(f"thp={sysfs_choice(str(sysfs / 'kernel/mm/transparent_hugepage/enabled'))}")
    rt = read_text(proc / "sys/kernel/sched_rt_runtime_us")
    parts.append(f"sched_rt_runtime_us={rt or 'unknown'}")
    return " ".join(parts)


def node_facts(name: str, proc: Path = Path("/proc"), sysfs: Path = Path("/sys"),
               hostname: str | None = None) -> NodeProvenance:
    """This node's facts (read by one rank per node)."""
    cmdline = read_text(proc / "cmdline")
    return NodeProvenance(name=name, hostname=hostname or socket.gethostname(),
                     cpu_model=cpu_model(proc), kernel_cmdline=cmdline,
                     isolation=isolation(cmdline, sysfs, proc))


def launch_environment(env: Mapping[str, str]) -> list[str]:
    """NAME=value of the launcher's and mckmpi's variables, sorted; secrets withheld."""
    return [f"{k}={'(withheld)' if _SECRET.search(k) else v}"
            for k, v in sorted(env.items()) if k.startswith(ENV_PREFIXES)]


#: Per-component variables of a heterogeneous step: SLURM_<NAME>_HET_GROUP_<n> (Slurm 20.02
#: and later) or SLURM_<NAME>_PACK_GROUP_<n> (what 22.05's srun still exports to tasks).
_HET_GROUP = re.compile(r"SLURM_(\w+?)_(?:HET|PACK)_GROUP_(\d+)$")


def het_groups(env: Mapping[str, str], name: str) -> dict[int, str]:
    """component -> value of SLURM_<name>_HET_GROUP_<n> (or _PACK_GROUP_<n>)."""
    out = {}
    for key, value in env.items():
        m = _HET_GROUP.match(key)
        if m and m.group(1) == name:
            out[int(m.group(2))] = value
    return out


def het_component(env: Mapping[str, str]) -> str:
    """Which component of a heterogeneous job this rank's job record is ('' outside one):
    the group whose job id is SLURM_JOB_ID, else SLURM_HET_JOB_OFFSET."""
    job = env.get("SLURM_JOB_ID", "")
    for group, value in sorted(het_groups(env, "JOB_ID").items()):
        if job and value == job:
            return str(group)
    return env.get("SLURM_HET_JOB_OFFSET", "")


def slurm_facts(env: Mapping[str, str], version: str = "") -> dict[str, str]:
    """The Slurm step a rank runs in (every value '' outside Slurm)."""
    get = env.get
    return {
        "slurm_job_id": get("SLURM_JOB_ID", get("SLURM_JOBID", "")),
        "slurm_step_id": get("SLURM_STEP_ID", get("SLURM_STEPID", "")),
        "slurm_array_job_id": get("SLURM_ARRAY_JOB_ID", ""),
        "slurm_array_task_id": get("SLURM_ARRAY_TASK_ID", ""),
        "slurm_het_job_id": get("SLURM_HET_JOB_ID", "") or het_groups(env, "JOB_ID").get(0, ""),
        "slurm_het_component": het_component(env),
        "slurm_het_size": get("SLURM_HET_SIZE", get("SLURM_PACK_SIZE", "")),
        "slurm_het_nodelists": " ".join(f"{g}:{v}" for g, v in
                                        sorted(het_groups(env, "JOB_NODELIST").items())),
        "slurm_cluster": get("SLURM_CLUSTER_NAME", ""),
        "slurm_partition": get("SLURM_JOB_PARTITION", ""),
        "slurm_step_nodelist": get("SLURM_STEP_NODELIST", ""),
        "slurm_job_nodelist": get("SLURM_JOB_NODELIST", ""),
        "slurm_version": version,
    }


def study_facts(env: Mapping[str, str]) -> dict[str, str]:
    """The study point a job belongs to, as its job script (or `study run`) says: point name,
    repeat index and axis values ('' for a job outside a study)."""
    return {"study_point": env.get("MCKMPI_STUDY_POINT", ""),
            "study_repeat": env.get("MCKMPI_STUDY_REPEAT", ""),
            "study_axes": env.get("MCKMPI_STUDY_AXES", "")}


def _command(argv: Sequence[str], cwd: Path | None = None) -> str:
    if shutil.which(argv[0]) is None:
        return ""
    try:
        res = subprocess.run(list(argv), capture_output=True, text=True, cwd=cwd,
                             timeout=_COMMAND_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return res.stdout.strip() if res.returncode == 0 else ""


def slurm_version(env: Mapping[str, str]) -> str:
    """The Slurm release of the step's client commands ('slurm 22.05.8'); '' outside Slurm."""
    if not (env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")):
        return ""
    return _command(["srun", "--version"])


def source_commit(root: Path = SOURCE_ROOT) -> str:
    """The git commit of the source tree mckmpi runs from, '+dirty' when tracked files
    differ from it; '' for an installed copy that is not a checkout."""
    if not (root / ".git").exists():
        return ""
    commit = _command(["git", "rev-parse", "HEAD"], root)
    if not commit:
        return ""
    dirty = _command(["git", "status", "--porcelain", "--untracked-files=no"], root)
    return commit + ("+dirty" if dirty else "")


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes, '' when it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while block := fh.read(_HASH_BLOCK):
                digest.update(block)
    except OSError:
        return ""
    return digest.hexdigest()


def app_file(kind: str, target: str) -> str:
    """The file that is the app: the script or executable, a module's source file."""
    if kind != "module":
        return str(Path(target).resolve())
    try:
        spec = importlib.util.find_spec(target)
    except (ImportError, ValueError):
        return ""
    return spec.origin if spec is not None and spec.origin not in (None, "built-in") else ""


def parent_command(pid: int | None = None, proc: Path = Path("/proc")) -> str:
    """The command line of the process that started this rank (mpiexec, prted, slurmstepd)."""
    raw = read_text(proc / str(os.getppid() if pid is None else pid) / "cmdline")
    return " ".join(a for a in raw.split("\0") if a)


def shared_hosts(nodes: Sequence[NodeProvenance]) -> bool:
    """Whether several nodes of the job are one machine (virtual nodes, or several slurmd on
    one host): their 'separate' cores are the same CPUs, and noise crosses nodes."""
    return len({n.hostname for n in nodes}) < len(nodes)


def job_facts(env: Mapping[str, str], kind: str, target: str, argv: Sequence[str]) -> dict[str, Any]:
    """What rank 0 records once for the whole job."""
    path = app_file(kind, target)
    facts: dict[str, Any] = slurm_facts(env, slurm_version(env))
    facts.update(study_facts(env))
    facts.update({
        "launch_command": " ".join(argv),
        "parent_command": parent_command(),
        "environment": launch_environment(env),
        "source_commit": source_commit(),
        "app_file": path,
        "app_sha256": file_sha256(path) if path else "",
    })
    return facts


def node_columns(nodes: Sequence[NodeProvenance]) -> dict[str, list[str]]:
    """Per-node facts as parallel lists (`node_name`, `node_hostname`, ...), index = node id."""
    return {f"node_{f.name}": [str(getattr(n, f.name)) for n in nodes] for f in fields(NodeProvenance)}


def nodes_of(provenance: Mapping[str, Any]) -> list[NodeProvenance]:
    """The per-node facts of a run file's provenance (inverse of `node_columns`)."""
    columns = {f.name: list(provenance.get(f"node_{f.name}", []) or []) for f in fields(NodeProvenance)}
    count = len(columns["name"])
    return [NodeProvenance(**{k: (v[i] if i < len(v) else "") for k, v in columns.items()})
            for i in range(count)]


def attributes(job: Mapping[str, Any], nodes: Sequence[NodeProvenance]) -> dict[str, Any]:
    """The /provenance attributes of the job's and every node's facts."""
    return {**dict(job), **node_columns(nodes), "shared_hosts": shared_hosts(nodes)}


def record(tracer: Tracer, job: Mapping[str, Any], nodes: Sequence[NodeProvenance]) -> None:
    """Put the job's and every node's facts into the /provenance group (rank 0's call
    counts: group attributes are rank 0's values), and say when nodes shared a host."""
    tracer.attrs("provenance", **attributes(job, nodes))
    note = shared_hosts_note(nodes)
    if note:
        print(f"mckmpi: note: {note}", file=sys.stderr, flush=True)


def shared_hosts_note(nodes: Sequence[NodeProvenance]) -> str:
    """One line when nodes of the job were one machine, '' otherwise."""
    if not shared_hosts(nodes):
        return ""
    by_host: dict[str, list[str]] = {}
    for n in nodes:
        by_host.setdefault(n.hostname, []).append(n.name)
    shared = "; ".join(f"{', '.join(names)} on {host}" for host, names in sorted(by_host.items())
                       if len(names) > 1)
    return (f"nodes {shared} share one machine: their CPUs, noise and timings are not "
            "independent (provenance shared_hosts)")


def gather(world: Any, node_leader: bool, name: str) -> list[NodeProvenance]:
    """Every node's facts on rank 0 (in node order; [] elsewhere): collective over `world`,
    one reader per node (`node_leader`: the node's local rank 0)."""
    mine = node_facts(name) if node_leader else None
    everyone = world.gather(mine, root=0)
    return [n for n in everyone or [] if n is not None]
