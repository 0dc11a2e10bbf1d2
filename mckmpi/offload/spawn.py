"""Starting, waiting for and sweeping a node proxy, from the rank side.

The node-local rank 0 starts its node's proxy with `start_node_proxy`, which spawns
`mckmpi proxy --socket PATH ...` (the command a user runs to start one by hand) in a private
run directory and returns a `ProxyHandle` once it listens. Every rank waits for the socket
(`wait_for_socket`) before it attaches; `sweep_stale` removes what killed proxies of earlier
jobs left behind. Nothing here imports the proxy's own code: the proxy is another process.
"""

from __future__ import annotations

import os
import select
import signal
import stat
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from mckmpi.offload import protocol, seccomp
from mckmpi.offload.errors import OffloadError

SOCKET_NAME = "proxy.sock"
#: The longest path a Unix socket may be bound to (sun_path holds 108 bytes with its NUL).
MAX_SOCKET_PATH = 107
#: Default spin of a proxy that has Linux cores of its own (see `loop.Emulator.serve`).
SPIN_US = 50.0


def socket_path(run_dir: Path) -> Path:
    """Where the proxy of `run_dir` listens."""
    return Path(run_dir) / SOCKET_NAME



class ProxyHandle:
    """The node proxy as seen by the rank that started it.

    Deliberately not a subprocess.Popen: the proxy outlives the rank that started it
    whenever node-mates still run, and a Popen collected while its child runs complains.
    Liveness comes from a pidfd, so it is exact even after the pid is reaped.
    """

    def __init__(self, pid: int, socket_path: Path, run_dir: Path) -> None:
        self.pid = pid
        self.socket_path = socket_path
        self.run_dir = run_dir
        self.returncode: int | None = None
        self._pidfd = seccomp.pidfd_open(pid)

    def alive(self) -> bool:
        return self._reap(0.0) is None

    def wait(self, timeout: float | None = None) -> int:
        """The proxy's exit status; TimeoutError if it still runs after `timeout` s."""
        status = self._reap(timeout)
        if status is None:
            raise TimeoutError(f"the offload proxy (pid {self.pid}) still runs after {timeout} s")
        return status

    def terminate(self) -> None:
        if self.alive():
            signal.pidfd_send_signal(self._pidfd, signal.SIGTERM)

    def _reap(self, timeout: float | None) -> int | None:
        if self.returncode is None and select.select([self._pidfd], [], [], timeout)[0]:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
            os.close(self._pidfd)
        return self.returncode


def runtime_dir(job_key: str, node: int | None,
                env: Mapping[str, str] = os.environ) -> tuple[Path, str | None]:
    """The private directory of one job's proxy on one node, and a warning when the usual
    place could not be used.

    Usually ``$XDG_RUNTIME_DIR/mckmpi-UID/KEY-nodeN`` (else under /tmp). Every level is
    checked, not trusted: the parent must belong to this user or root and, if others may
    write to it, be sticky (/tmp); ``mckmpi-UID`` must be a real directory (no symlink)
    owned by this user with mode 0700. Another user can create /tmp/mckmpi-UID before us
    (and /tmp/mckmpi-0 before root): then the job gets a directory of its own next to it,
    ``mckmpi-UID-KEY-nodeN``, created private by `prepare_run_dir`, and the warning says so.
    """
    uid = os.geteuid()
    parent = Path(tempfile.gettempdir())
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime and _safe_parent(Path(runtime), uid) is None:
        parent = Path(runtime)
    leaf = f"{job_key}-node{node}"
    base = parent / f"mckmpi-{uid}"
    problem = _safe_parent(parent, uid)
    if problem is None:
        try:
            base.mkdir(mode=0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            problem = f"{base} cannot be created ({exc.strerror})"
    if problem is None:
        st = base.lstat()
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            problem = f"{base} is not a directory"
        elif st.st_uid != uid:
            problem = f"{base} belongs to uid {st.st_uid}, not to uid {uid}"
        elif st.st_mode & 0o077:
            os.chmod(base, 0o700)  # ours: made private again
    own = base / leaf if problem is None else parent / f"mckmpi-{uid}-{leaf}"
    if len(os.fsencode(socket_path(own))) > MAX_SOCKET_PATH:
        raise OffloadError(f"the proxy socket {socket_path(own)} would be longer than the "
                           f"{MAX_SOCKET_PATH} bytes a Unix socket path may have: set "
                           "TMPDIR (or XDG_RUNTIME_DIR) to a shorter directory, or --tag shorter")
    return own, None if problem is None else f"{problem}: this job's proxy directory is {own}"


def _safe_parent(path: Path, uid: int) -> str | None:
    """Why `path` may not hold private directories (None: it may)."""
    try:
        st = path.lstat()
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    if st.st_uid not in (uid, 0):
        return f"{path} belongs to uid {st.st_uid}"
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        return f"{path} is writable by others and not sticky"
    return None


def prepare_run_dir(run_dir: Path) -> bool:
    """Create `run_dir` private (0700) or check an existing one is; True if created."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(mode=0o700, parents=False)
        created = True
    except FileExistsError:
        created = False
    except FileNotFoundError:
        raise OffloadError(f"the parent of the proxy directory {run_dir} does not exist") from None
    st = run_dir.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise OffloadError(f"proxy directory {run_dir} must be a directory owned by uid "
                           f"{os.geteuid()} with mode 0700")
    return created


def start_node_proxy(run_dir: Path, cpus: list[int], *, expected: int | None = None,
                     records_dir: Path | None = None, idle_timeout: float = 60.0,
                     spin_us: float | None = None, timeout: float = 10.0,
                     compiled: bool = True) -> ProxyHandle:
    """Spawn this node's proxy on `cpus`, listening in `run_dir`; return once it listens.

    Call it from the node-local rank 0 *before* that rank attaches: a child inherits its
    parent's seccomp filter, and a proxy under its own ranks' filter would deadlock.
    `expected`: the node's number of ranks (the proxy stays until that many registered and
    left). `spin_us` defaults to SPIN_US when the proxy gets CPUs of its own, else 0.
    `compiled=False` serves every call in Python (`mckmpi proxy --interpreted`).
    """
    if seccomp.installed():
        raise OffloadError("start_node_proxy called after attach: the proxy would inherit "
                           "the rank's seccomp filter")
    run_dir = Path(run_dir)
    created = prepare_run_dir(run_dir)
    path = socket_path(run_dir)
    if path.exists():
        raise OffloadError(f"a proxy socket already exists at {path}")
    cmd = [sys.executable, "-m", "mckmpi", "proxy", "--socket", str(path),
           "--parent-pid", str(os.getpid()), "--idle-timeout", str(idle_timeout)]
    if cpus:
        cmd += ["--cpus", ",".join(map(str, cpus))]
    if expected is not None:
        cmd += ["--expect", str(expected)]
    if records_dir is not None:
        cmd += ["--records-dir", str(records_dir)]
    spin = (SPIN_US if cpus else 0.0) if spin_us is None else spin_us
    if spin:
        cmd += ["--spin-us", str(spin)]
    if created:
        cmd.append("--remove-dir")
    if not compiled:
        cmd.append("--interpreted")
    # stdin from /dev/null; every other inheritable descriptor of the rank (MPI's) closed
    actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)]
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and _inheritable(fd):
            actions.append((os.POSIX_SPAWN_CLOSE, fd))
    # a normal Linux process, whatever real-time policy the rank runs under: a proxy that
    # inherited SCHED_FIFO would starve its own main loop (and other Linux work) on its cores
    # a session of its own: the signal a launcher sends the ranks' process group when the
    # job is cancelled is for the ranks; the proxy serves them until they are gone, then ends
    pid = os.posix_spawn(sys.executable, cmd, os.environ, file_actions=actions,
                         scheduler=(os.SCHED_OTHER, os.sched_param(0)), setsid=True)
    handle = ProxyHandle(pid, path, run_dir)
    try:
        wait_for_socket(path, timeout, handle)
    except OffloadError:
        handle.terminate()
        handle.wait(5)
        if created:
            remove_run_dir(run_dir)
        raise
    return handle


def remove_run_dir(run_dir: Path) -> None:
    """Remove a proxy directory and what a proxy leaves in it (socket, half-bound socket)."""
    for entry in Path(run_dir).glob(f"{SOCKET_NAME}*"):
        entry.unlink(missing_ok=True)
    try:
        Path(run_dir).rmdir()
    except OSError:
        pass  # not ours to empty: something else lives there


def sweep_stale(base: Path, *, min_age: float = 60.0) -> list[Path]:
    """Remove the directories under `base` of proxies that died without cleaning up
    (SIGKILL, a node crash): a socket nobody listens on, or an old directory without one
    (a proxy listens within seconds of its directory's creation). Returns what went."""
    removed = []
    for run_dir in Path(base).iterdir():
        sock_path = socket_path(run_dir)
        try:
            if sock_path.exists():
                protocol.connect(str(sock_path)).close()
                continue  # a live proxy
            if not run_dir.is_dir() or time.time() - run_dir.stat().st_mtime < min_age:
                continue
        except ConnectionRefusedError:
            pass
        except OSError:
            continue
        remove_run_dir(run_dir)
        if not run_dir.exists():
            removed.append(run_dir)
    return removed


def _inheritable(fd: int) -> bool:
    try:
        return os.get_inheritable(fd)
    except OSError:
        return False  # the descriptor listing /proc/self/fd itself, already closed


def wait_for_socket(path: str | Path, timeout: float, handle: ProxyHandle | None = None) -> None:
    """Wait until a proxy listens at `path` (it appears only once listening)."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if handle is not None and not handle.alive():
            raise OffloadError(f"the offload proxy exited with status {handle.returncode} "
                               f"before listening at {path}")
        if time.monotonic() > deadline:
            raise OffloadError(f"no offload proxy listening at {path} after {timeout:g} s")
        time.sleep(0.005)
