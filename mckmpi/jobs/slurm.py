"""Slurm from Python: is this a job, which nodes, submit a batch script, follow its state.

Everything goes through Slurm's own client commands, so it works with any Slurm that users
have (no REST daemon, no accounting database required):

- node lists are expanded by ``scontrol show hostnames``, the parser Slurm itself uses;
- jobs are submitted with ``sbatch --parsable`` and followed by polling ``scontrol show job``
  (``sbatch --wait`` polls the controller slowly and blocks the caller);
- a job the controller has already forgotten (older than MinJobAge) is looked up with
  ``sacct`` and, on clusters without accounting, in the plain-text job completion log;
- partitions and nodes (CPUs, specialised cores, host names) come from ``scontrol show
  partition`` and ``scontrol show node``, so a study plan is checked against the cluster
  before anything is submitted.

Every function takes an optional ``env``: the environment of the Slurm commands (for
example one whose SLURM_CONF points at a particular cluster). By default they inherit ours.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

from mckmpi.errors import UsageError
from mckmpi.utility.units import parse_cpulist

# States after which a job never changes again.
FINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
    "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
})
COMMAND_TIMEOUT = 30.0  # seconds; a client that does not answer means a sick controller
_JOB_ID = re.compile(r"\d+(_\d+)?")
# "Key=value Key=value ..." as printed by `scontrol -o` and the jobcomp/filetxt log; values
# may contain '=' (TRES=cpu=2,node=1) and, rarely, spaces.
_FIELD = re.compile(r"(?:^|\s)([A-Za-z][\w/:.()-]*)=")


class SlurmError(UsageError):
    """A Slurm command failed or refused a request."""


class SlurmNotFound(SlurmError):
    """Slurm's client commands are not installed or no cluster can be reached."""


class JobNotFound(SlurmError):
    """No record of the job anywhere Slurm keeps one."""


class JobTimeout(SlurmError):
    """A job did not finish within the time the caller was willing to wait."""


class JobState(TypedDict):
    """What is known about a job; exit_code and signal are None until it has finished."""

    job_id: str
    name: str | None
    state: str
    exit_code: int | None
    signal: int | None
    reason: str | None
    nodes: str | None
    stdout: str | None
    stderr: str | None
    source: str  # "scontrol", "sacct" or "jobcomp": where the record came from


@dataclass(frozen=True)
class NodeInfo:
    """A node as the controller describes it.

    `spec_cpus` are the CPUs Slurm reserves for the system (CoreSpecCount/CPUSpecList, in
    Slurm's abstract CPU numbering, which is Linux's on nodes without hyper-threads);
    `usable_cpus` is what a job may be given without asking for them (CPUEfctv).
    """

    name: str
    hostname: str
    cpus: int
    usable_cpus: int
    core_spec_count: int
    spec_cpus: tuple[int, ...]
    partitions: tuple[str, ...]
    state: str


@dataclass(frozen=True)
class PartitionInfo:
    """A partition: its name, its node list (Slurm syntax), whether it is the default."""

    name: str
    nodes: str
    default: bool
    state: str


def in_slurm_job(env: Mapping[str, str] | None = None) -> bool:
    """True inside a Slurm allocation (batch script, salloc shell or srun task)."""
    env = os.environ if env is None else env
    return bool(env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID"))


def slurm_available(env: Mapping[str, str] | None = None) -> bool:
    """True if Slurm's clients are installed and a controller answers them."""
    try:
        res = _run(["scontrol", "ping"], env, timeout=10)
    except SlurmError:
        return False
    return res.returncode == 0 and " is UP" in res.stdout


def expand_hostlist(nodelist: str, env: Mapping[str, str] | None = None) -> list[str]:
    """Host names of a Slurm node list ('n[1-3],gpu07' -> n1, n2, n3, gpu07), in order."""
    if not nodelist.strip():
        # scontrol would silently expand SLURM_JOB_NODELIST instead.
        raise SlurmError("empty Slurm node list")
    res = _run(["scontrol", "show", "hostnames", nodelist], env)
    if res.returncode != 0:
        raise SlurmError(f"cannot expand node list {nodelist!r}: {_last_line(res)}")
    hosts = res.stdout.split()
    # Slurm's parser echoes malformed ranges ("n[1-" -> "n]") instead of failing.
    if not hosts or any(c in h for h in hosts for c in "[],"):
        raise SlurmError(f"malformed Slurm node list {nodelist!r}")
    return hosts


def mpi_plugins(env: Mapping[str, str] | None = None) -> list[str]:
    """The MPI plugin types this Slurm offers to `srun --mpi=` (e.g. pmix, pmi2, none)."""
    res = _run(["srun", "--mpi=list"], env)
    if res.returncode != 0:
        raise SlurmError(f"srun --mpi=list failed: {_last_line(res)}")
    text = res.stdout + res.stderr  # older releases print the list on stderr
    return [ln.strip() for ln in text.splitlines() if ln.startswith("\t") and ln.strip()]


def config(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The controller's running configuration (`scontrol show config`) as key -> value."""
    res = _run(["scontrol", "show", "config"], env)
    if res.returncode != 0:
        raise SlurmError(f"scontrol show config failed: {_last_line(res)}")
    conf = {}
    for line in res.stdout.splitlines():
        key, sep, value = line.partition(" = ")
        if sep:
            conf[key.strip()] = value.strip()
    return conf


def partitions(env: Mapping[str, str] | None = None) -> list[PartitionInfo]:
    """Every partition the controller knows, in its order."""
    res = _run(["scontrol", "show", "partition", "-o"], env)
    if res.returncode != 0:
        raise SlurmError(f"scontrol show partition failed: {_last_line(res)}")
    out = []
    for line in res.stdout.splitlines():
        if line.startswith("PartitionName="):
            rec = parse_fields(line)
            out.append(PartitionInfo(name=rec["PartitionName"], nodes=rec.get("Nodes", ""),
                                     default=rec.get("Default") == "YES",
                                     state=rec.get("State", "UNKNOWN")))
    return out


def nodes(nodelist: str, env: Mapping[str, str] | None = None) -> list[NodeInfo]:
    """The nodes of a Slurm node list ('n[1-4]'), as `scontrol show node` describes them."""
    if not nodelist.strip() or nodelist == "(null)":
        raise SlurmError("empty Slurm node list")
    res = _run(["scontrol", "show", "node", "-o", nodelist], env)
    if res.returncode != 0:
        raise SlurmError(f"scontrol show node {nodelist} failed: {_last_line(res)}")
    return [parse_node(parse_fields(line)) for line in res.stdout.splitlines()
            if line.startswith("NodeName=")]


def parse_node(rec: Mapping[str, str]) -> NodeInfo:
    """A NodeInfo from one `scontrol show node -o` record."""
    def number(key: str, default: int) -> int:
        value = rec.get(key, "")
        return int(value) if value.isdigit() else default

    cpus = number("CPUTot", 0)
    spec_list = rec.get("CPUSpecList", "")
    spec = parse_cpulist(spec_list) if spec_list not in ("", "(null)") else ()
    parts = rec.get("Partitions", "")
    return NodeInfo(
        name=rec["NodeName"], hostname=rec.get("NodeHostName") or rec["NodeName"], cpus=cpus,
        # Releases before 22.05 print no CPUEfctv: the specialised CPUs are what jobs lack.
        usable_cpus=number("CPUEfctv", cpus - len(spec)),
        core_spec_count=number("CoreSpecCount", 0), spec_cpus=spec,
        partitions=tuple(p for p in parts.split(",") if p and p != "(null)"),
        state=rec.get("State", "UNKNOWN"))


def specialised_cpus(env: Mapping[str, str] | None = None) -> tuple[int, ...]:
    """This Slurm node's specialised CPUs (CPUSpecList), () outside Slurm or without any.

    Slurm exports nothing about core specialisation to a job, so the node's record is asked
    for; the answer is kept per job and node in a file under the runtime directory, under
    a lock, so the ranks of a node cost slurmctld one `scontrol show node` together."""
    import fcntl

    environ = os.environ if env is None else env
    node, job = environ.get("SLURMD_NODENAME"), environ.get("SLURM_JOB_ID")
    if not node or not job:
        return ()
    base = Path(environ.get("XDG_RUNTIME_DIR") or "/tmp") / f"mckmpi-{os.getuid()}"
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    cache = base / f"slurm-spec-{job}-{node}"
    with open(base / f"slurm-spec-{job}-{node}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not cache.is_file():
            found = nodes(node, env)
            text = ",".join(str(c) for c in found[0].spec_cpus) if found else ""
            tmp = cache.with_name(cache.name + f".{os.getpid()}")
            tmp.write_text(text)
            tmp.replace(cache)
        text = cache.read_text().strip()
    return tuple(int(c) for c in text.split(",") if c)


def submit(script_path: str | os.PathLike[str], *, extra_args: Iterable[str] = (),
           env: Mapping[str, str] | None = None) -> str:
    """Submit a batch script with sbatch and return its job id."""
    script = Path(script_path)
    if not script.is_file():
        raise SlurmError(f"job script {script} does not exist")
    res = _run(["sbatch", "--parsable", *extra_args, str(script)], env)
    if res.returncode != 0:
        raise SlurmError(f"sbatch rejected {script}: {_last_line(res)}")
    job_id = res.stdout.strip().split(";")[0]  # --parsable prints "id" or "id;cluster"
    if not _JOB_ID.fullmatch(job_id):
        raise SlurmError(f"sbatch printed no job id for {script}: {res.stdout.strip()!r}")
    return job_id


def job_state(job_id: str | int, env: Mapping[str, str] | None = None) -> JobState:
    """The job's state, exit code and output files: from the controller while it remembers
    the job, then from accounting (sacct) or the job completion log."""
    job_id = str(job_id)
    if not _JOB_ID.fullmatch(job_id):
        raise SlurmError(f"{job_id!r} is not a Slurm job id")
    for lookup in (_from_scontrol, _from_sacct, _from_jobcomp):
        state = lookup(job_id, env)
        if state is not None:
            return state
    raise JobNotFound(f"Slurm job {job_id} is unknown to scontrol, sacct and the job "
                      "completion log")


def job_states(job_ids: Iterable[str], env: Mapping[str, str] | None = None) -> dict[str, JobState]:
    """The states of many jobs (array tasks as 'A_T') from one `scontrol show job` of every
    job the controller remembers; the jobs it forgot are looked up one by one in accounting
    and the job completion log (`job_state`), unknown ones are left out."""
    wanted = [str(j) for j in job_ids]
    for job in wanted:
        if not _JOB_ID.fullmatch(job):
            raise SlurmError(f"{job!r} is not a Slurm job id")
    found: dict[str, JobState] = {}
    res = _run(["scontrol", "show", "job", "-o"], env)
    if res.returncode == 0:
        for line in res.stdout.splitlines():
            if not line.strip() or "JobId=" not in line:
                continue
            rec = parse_fields(line)
            names = [rec.get("JobId", "")]
            array, tasks = rec.get("ArrayJobId"), rec.get("ArrayTaskId", "")
            if array and tasks:
                # A pending array is one record for all its tasks: "0-5", "0,3-5%2".
                names += [f"{array}_{t}" for t in _task_ids(tasks)]
            for name in names:
                if name in wanted:
                    found[name] = _state(name, rec, "scontrol")
    for job in wanted:
        if job not in found:
            try:
                found[job] = job_state(job, env)
            except JobNotFound:
                pass
    return found


def _task_ids(spec: str) -> list[int]:
    """Array task ids of scontrol's ArrayTaskId ('3', '0-5', '0,2-4%2')."""
    out: list[int] = []
    for part in spec.split("%", 1)[0].split(","):
        lo, _, hi = part.partition("-")
        if lo.isdigit() and (not hi or hi.isdigit()):
            out += range(int(lo), int(hi or lo) + 1)
    return out


def wait(job_id: str | int, timeout: float, poll: float = 0.5,
         env: Mapping[str, str] | None = None) -> JobState:
    """Poll the job's state until it is final; raise JobTimeout after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        state = job_state(job_id, env)
        if state["state"] in FINAL_STATES:
            return state
        if time.monotonic() >= deadline:
            raise JobTimeout(f"Slurm job {job_id} still {state['state']} after {timeout:g} s")
        time.sleep(min(poll, max(deadline - time.monotonic(), 0.0)))


# --- lookups ----------------------------------------------------------------------------------

def _from_scontrol(job_id: str, env: Mapping[str, str] | None) -> JobState | None:
    res = _run(["scontrol", "show", "job", "-o", job_id], env)
    if res.returncode != 0:
        if "Invalid job id" in res.stderr:
            return None
        raise SlurmError(f"scontrol show job {job_id} failed: {_last_line(res)}")
    records = [parse_fields(line) for line in res.stdout.splitlines() if line.strip()]
    for rec in records:
        task = f"{rec.get('ArrayJobId')}_{rec.get('ArrayTaskId')}"
        if rec.get("JobId") == job_id or task == job_id:
            return _state(job_id, rec, "scontrol")
    return _state(job_id, records[0], "scontrol") if records else None


def _from_sacct(job_id: str, env: Mapping[str, str] | None) -> JobState | None:
    """Accounting record; None where accounting is disabled or has no such job."""
    try:
        # The free-text job name goes last: it may itself contain the '|' separator.
        res = _run(["sacct", "-X", "-n", "-P", "-j", job_id,
                    "-o", "State,ExitCode,NodeList,JobName"], env)
    except SlurmNotFound:
        return None
    lines = [ln for ln in res.stdout.splitlines() if ln.count("|") >= 3]
    if res.returncode != 0 or not lines:
        return None
    rec = dict(zip(("JobState", "ExitCode", "NodeList", "JobName"), lines[0].split("|", 3),
                   strict=True))
    rec["JobState"] = (rec.get("JobState") or "UNKNOWN").split()[0]  # "CANCELLED by 0"
    return _state(job_id, rec, "sacct")


def _from_jobcomp(job_id: str, env: Mapping[str, str] | None) -> JobState | None:
    """The last record of the job in a jobcomp/filetxt log, if the cluster writes one."""
    conf = config(env)
    if conf.get("JobCompType") != "jobcomp/filetxt" or not conf.get("JobCompLoc"):
        return None
    try:
        lines = Path(conf["JobCompLoc"]).read_text(errors="replace").splitlines()
    except OSError:
        return None
    prefix = f"JobId={job_id} "
    for line in reversed(lines):
        if line.startswith(prefix):
            rec = parse_fields(line)
            rec.setdefault("JobName", rec.get("Name", ""))
            return _state(job_id, rec, "jobcomp")
    return None


def _state(job_id: str, rec: Mapping[str, str | None], source: str) -> JobState:
    state = (rec.get("JobState") or "UNKNOWN").upper()
    exit_code = sig = None
    if state in FINAL_STATES and rec.get("ExitCode"):
        code, _, signo = str(rec["ExitCode"]).partition(":")
        exit_code, sig = int(code), int(signo or 0)

    def field(key: str) -> str | None:
        value = rec.get(key)
        return None if value in (None, "", "(null)", "None") else str(value)

    return JobState(job_id=job_id, name=field("JobName"), state=state, exit_code=exit_code,
                    signal=sig, reason=field("Reason"), nodes=field("NodeList"),
                    stdout=field("StdOut"), stderr=field("StdErr"), source=source)


def parse_fields(line: str) -> dict[str, str]:
    """Split a 'Key=value Key=value' record into a dict."""
    matches = list(_FIELD.finditer(line))
    fields = {}
    for m, nxt in zip(matches, matches[1:] + [None], strict=True):
        end = nxt.start() if nxt else len(line)
        fields[m.group(1)] = line[m.end():end].strip()
    return fields


# --- running commands ---------------------------------------------------------------------

def _run(argv: list[str], env: Mapping[str, str] | None,
         timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess[str]:
    path = (env if env is not None else os.environ).get("PATH", os.defpath)
    if shutil.which(argv[0], path=path) is None:
        raise SlurmNotFound(f"{argv[0]} not found: Slurm's client commands are not installed "
                            "(or not on PATH)")
    try:
        res = subprocess.run(argv, env=None if env is None else dict(env), capture_output=True,
                             text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{' '.join(argv[:3])} did not answer within {timeout:g} s: "
                         "is slurmctld running?") from None
    if res.returncode != 0 and "Could not establish a configuration source" in res.stderr:
        # Without SLURM_CONF or /etc/slurm/slurm.conf the clients fall back to DNS SRV records.
        raise SlurmNotFound(f"{argv[0]} finds no Slurm configuration: set SLURM_CONF (for the "
                            "cluster of launch/slurm-up: source its env file)")
    return res


def _last_line(res: subprocess.CompletedProcess[str]) -> str:
    """Slurm's own one-line reason: the last thing it printed."""
    lines = [ln.strip() for ln in (res.stderr or res.stdout).splitlines() if ln.strip()]
    return lines[-1] if lines else f"exit status {res.returncode}"
