"""Shared parts of launch/slurm-up and launch/slurm-down (standard library only).

The two scripts run before mckmpi is installed, so this module must not import it. It knows
where a cluster directory keeps its files and how to recognise and stop exactly the daemons
that slurm-up started: each is recorded with its PID and kernel start time, so a PID that
was reused by an unrelated process is never signalled.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

TEMPLATES = Path(__file__).resolve().parent
# Unix socket paths must fit in sun_path (108 bytes); the longest are slurmstepd's PMIx
# sockets, <dir>/nodes/<node>/spool/stepd.slurm.pmix.<job>.<step>.
MAX_DIR_LEN = 60


class ClusterError(Exception):
    """A failure the person running the script can act on; printed as one message."""


def default_dir() -> Path:
    """A private per-user directory: the runtime dir (tmpfs) when there is one."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime) and os.access(runtime, os.W_OK):
        return Path(runtime) / "mckmpi-slurm"
    return Path(f"/tmp/mckmpi-slurm-{os.getuid()}")


@dataclass(frozen=True)
class Layout:
    """Every path of one cluster directory."""

    dir: Path

    @property
    def conf(self) -> Path:
        return self.dir / "slurm.conf"

    @property
    def env(self) -> Path:
        return self.dir / "env"

    @property
    def task_prolog(self) -> Path:
        return self.dir / "task-prolog"

    @property
    def cluster(self) -> Path:
        return self.dir / "cluster.json"

    @property
    def daemons(self) -> Path:
        return self.dir / "run" / "daemons.json"

    @property
    def run(self) -> Path:
        return self.dir / "run"

    @property
    def log(self) -> Path:
        return self.dir / "log"

    @property
    def munge_key(self) -> Path:
        return self.dir / "munge-key" / "munge.key"

    @property
    def munge_socket(self) -> Path:
        return self.dir / "munge" / "munge.socket"

    def node_dir(self, node: str) -> Path:
        return self.dir / "nodes" / node


def client_env(layout: Layout) -> dict[str, str]:
    """The environment Slurm clients and daemons need: this cluster's SLURM_CONF only.

    Inherited SLURM_* variables (e.g. when run inside another job) would point the clients
    at that job or cluster instead.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["SLURM_CONF"] = str(layout.conf)
    return env


def slurm_cmd(layout: Layout, *args: str, timeout: float = 10.0) -> subprocess.CompletedProcess:
    """Run a Slurm client against this cluster; a hung client counts as a failure."""
    try:
        return subprocess.run(args, env=client_env(layout), capture_output=True, text=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(args, 124, "", f"{args[0]} timed out")


def responding_nodes(layout: Layout) -> dict[str, str]:
    """Node name -> state (idle, mixed, ...) for nodes whose slurmd answers the controller."""
    res = slurm_cmd(layout, "sinfo", "-h", "-N", "-r", "-o", "%N %T")
    if res.returncode != 0:
        return {}
    nodes = {}
    for line in res.stdout.splitlines():
        name, _, state = line.strip().partition(" ")
        if name:
            nodes[name] = state.strip().lower()
    return nodes


# --- daemon records -------------------------------------------------------------------------

def start_time(pid: int) -> int | None:
    """The kernel start time of a live process (clock ticks since boot), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] == "Z":  # a zombie has exited; only its exit status is left
        return None
    return int(fields[19])


def read_daemons(layout: Layout) -> list[dict]:
    try:
        return json.loads(layout.daemons.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise ClusterError(f"cannot read daemon records {layout.daemons}: {exc}") from exc


def write_daemons(layout: Layout, records: list[dict]) -> None:
    """Record atomically, so a crash mid-start never leaves a half-written PID list."""
    tmp = layout.daemons.with_suffix(".tmp")
    tmp.write_text(json.dumps(records, indent=1) + "\n")
    os.replace(tmp, layout.daemons)


def alive(rec: dict) -> bool:
    """True only for the very process that was recorded, not a later one with its PID."""
    return start_time(rec["pid"]) == rec["start"]


def stop(records: list[dict], grace: float) -> list[str]:
    """TERM the recorded daemons that are still ours, KILL those left after `grace` seconds.

    Returns the names of daemons that had to be killed.
    """
    targets = [r for r in records if alive(r)]
    for rec in targets:
        _signal(rec, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(alive(r) for r in targets):
        _reap()
        time.sleep(0.1)
    killed = []
    for rec in targets:
        if alive(rec):
            _signal(rec, signal.SIGKILL)
            killed.append(rec["name"])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(alive(r) for r in targets):
        _reap()
        time.sleep(0.05)
    return killed


def _signal(rec: dict, sig: int) -> None:
    try:
        os.kill(rec["pid"], sig)
    except ProcessLookupError:
        pass


def _reap() -> None:
    """Collect exited children, so daemons this process started do not linger as zombies."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


# --- diagnostics and cleanup ----------------------------------------------------------------

def log_tails(layout: Layout, lines: int = 15) -> str:
    """The last lines of every daemon log, for error messages that explain a failed start."""
    out = []
    for path in sorted(layout.log.glob("*")):
        if path.name == "jobcomp.log" or not path.is_file():
            continue
        text = path.read_text(errors="replace").splitlines()[-lines:]
        out.append(f"==> {path} <==")
        out.extend(text or ["(empty)"])
    return "\n".join(out)


def remove_sockets(layout: Layout) -> None:
    """Remove the munge socket and stale slurmstepd sockets left by killed daemons."""
    candidates = [layout.munge_socket, layout.munge_socket.with_name("munge.socket.lock")]
    candidates += list((layout.dir / "nodes").glob("*/spool/*"))
    for path in candidates:
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            continue
        if stat.S_ISSOCK(mode) or path.name.endswith(".lock"):
            path.unlink(missing_ok=True)


def remove_shm(layout: Layout) -> None:
    """Remove the per-node Open MPI shared-memory directories of this cluster."""
    try:
        shm_root = json.loads(layout.cluster.read_text())["shm_root"]
    except (OSError, ValueError, KeyError):
        return
    shutil.rmtree(shm_root, ignore_errors=True)
