"""Machinery shared by the offload tests (no tests here).

Ranks are forked from the pytest process and only the child ever installs a filter (a
filter cannot be removed); a parent talks to its child over a socketpair. A proxy runs as a
subprocess (root) or as a forked child that dropped to nobody (the interpreter lives under
/root, which nobody cannot read, so nobody processes are forked after every import).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import os
import shutil
import socket
import stat
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any


from mckmpi.offload import accounting, client, server, spawn
from mckmpi.offload.policy import Policy
from mckmpi.offload.syscalls import FD_BASE

NOBODY = 65534
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def drop_to_nobody() -> None:
    """Become nobody, staying dumpable (a credential change clears it; the proxy needs it)."""
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    _libc.prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE


class Child:
    """A forked process running `fn(conn, *args)`; the parent holds the other end."""

    def __init__(self, pid: int, conn: Connection) -> None:
        self.pid = pid
        self.conn = conn
        self.status: int | None = None

    def send(self, obj: Any) -> None:
        self.conn.send(obj)

    def recv(self, timeout: float = 30) -> Any:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"child {self.pid} did not answer within {timeout} s")
        return self.conn.recv()

    def call(self, obj: Any, timeout: float = 30) -> Any:
        self.send(obj)
        return self.recv(timeout)

    def wait(self, timeout: float = 30) -> int:
        """Exit code (negative signal number if killed); kills the child on timeout."""
        if self.status is not None:
            return self.status
        deadline = time.monotonic() + timeout
        while True:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
                self.conn.close()
                return self.status
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"child {self.pid} did not exit within {timeout} s")
            time.sleep(0.01)

    def kill(self) -> None:
        try:
            os.kill(self.pid, 9)
        except ProcessLookupError:
            pass
        if self.status is None:
            _, status = os.waitpid(self.pid, 0)
            self.status = os.waitstatus_to_exitcode(status)
            self.conn.close()


def fork(fn: Callable[..., None], *args: Any, nobody: bool = False,
         stderr_path: str | None = None) -> Child:
    a, b = socket.socketpair()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            a.close()
            if stderr_path:
                fd = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
                os.dup2(fd, 2)
                os.close(fd)
                sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115 -- lives until _exit
            if nobody:
                drop_to_nobody()
            fn(Connection(b.detach()), *args)
            code = 0
        except BaseException:  # noqa: BLE001 -- a forked child reports and always _exits
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    b.close()
    return Child(pid, Connection(a.detach()))


# --- proxies ---------------------------------------------------------------------------------


def _nobody_proxy(conn: Connection, sock: str, expected: int) -> None:
    conn.close()
    os._exit(server.serve(sock, expected=expected, parent_pid=os.getppid(), idle_timeout=30))


def nobody_proxy(run_dir: Path, expected: int, log: Path) -> tuple[Child, Path]:
    """A proxy running as nobody in a nobody-owned 0700 `run_dir`; its stderr goes to `log`."""
    run_dir.mkdir(mode=0o700)
    os.chown(run_dir, NOBODY, NOBODY)
    path = spawn.socket_path(run_dir)
    child = fork(_nobody_proxy, str(path), expected, nobody=True, stderr_path=str(log))
    spawn.wait_for_socket(path, 10)
    return child, path


@contextmanager
def scratch(owner: int | None = None):
    """A directory under /tmp (offloaded by the default policy), removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="mckmpi-offload-", dir="/tmp"))
    os.chmod(d, 0o755)
    if owner is not None:
        os.chown(d, owner, owner)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def attach(sock: Path | str, rank: int = 0, **kw: Any) -> client.OffloadSession:
    return client.attach(sock, rank=rank, arena_memfd=kw.pop("arena_memfd", None),
                         policy=kw.pop("policy", Policy()), **kw)


def proxy_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def io_counters(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            k, v = line.split(":")
            out[k] = int(v)
    return out


def seccomp_mode(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Seccomp:"):
                return int(line.split()[1])
    raise AssertionError("no Seccomp line")


# --- a small file-operation language, run identically natively and offloaded -------------------

NAMES = ("a", "b", "d", "d/e", "a/x", "nodir/x", "ln")


def _getdents(fd: int) -> list[str]:
    buf = ctypes.create_string_buffer(8192)
    names = []
    while True:
        n = _libc.syscall(ctypes.c_long(217), ctypes.c_long(fd), buf, ctypes.c_long(len(buf)))
        if n < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        if n == 0:
            return sorted(names)
        pos = 0
        raw = buf.raw
        while pos < n:
            reclen = int.from_bytes(raw[pos + 16:pos + 18], "little")
            name = raw[pos + 19:pos + reclen].split(b"\0", 1)[0].decode()
            names.append(name)
            pos += reclen


def _digest(data: bytes) -> tuple[int, str]:
    return len(data), hashlib.sha1(data).hexdigest()[:12]


def _stat(st: os.stat_result) -> tuple[int, int, int, int]:
    size = st.st_size if not stat.S_ISDIR(st.st_mode) else -1
    return size, stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_nlink


class Ops:
    """Executes op lists in a scratch directory of the calling process (the rank)."""

    def __init__(self, offloaded: bool) -> None:
        probe = os.open("/", os.O_RDONLY)  # not offloaded: a low number in both modes
        os.close(probe)
        self.base = FD_BASE if offloaded else probe
        self.slots: list[int] = []

    def fd(self, slot: int) -> int:
        return self.slots[slot % len(self.slots)] if self.slots else self.base + 999

    def run(self, ops: list[tuple]) -> list[Any]:
        out = []
        for op in ops:
            try:
                out.append(("ok", self.one(op)))
            except OSError as e:
                out.append(("err", errno.errorcode.get(e.errno, e.errno)))
        for fd in self.slots:
            try:
                os.close(fd)
            except OSError:
                pass
        self.slots.clear()
        return out

    def one(self, op: tuple) -> Any:
        kind, *a = op
        if kind in ("open", "openat", "dup"):
            if kind == "open":
                fd = os.open(a[0], a[1], a[2])
            elif kind == "openat":
                fd = os.open(a[1], a[2], 0o644, dir_fd=self.fd(a[0]))
            else:
                fd = os.dup(self.fd(a[0]))
            self.slots.append(fd)
            return fd - self.base
        if kind == "close":
            return os.close(self.fd(a[0]))
        if kind == "read":
            return _digest(os.read(self.fd(a[0]), a[1]))
        if kind == "write":
            return os.write(self.fd(a[0]), a[1])
        if kind == "pread":
            return _digest(os.pread(self.fd(a[0]), a[1], a[2]))
        if kind == "pwrite":
            return os.pwrite(self.fd(a[0]), a[1], a[2])
        if kind == "readv":
            bufs = [bytearray(n) for n in a[1]]
            n = os.readv(self.fd(a[0]), bufs)
            return n, _digest(b"".join(bufs)[:n])
        if kind == "preadv":
            bufs = [bytearray(n) for n in a[1]]
            n = os.preadv(self.fd(a[0]), bufs, a[2])
            return n, _digest(b"".join(bufs)[:n])
        if kind == "pwritev":
            return os.pwritev(self.fd(a[0]), a[1], a[2])
        if kind == "writev":
            return os.writev(self.fd(a[0]), a[1])
        if kind == "lseek":
            return os.lseek(self.fd(a[0]), a[1], a[2])
        if kind == "ftruncate":
            return os.ftruncate(self.fd(a[0]), a[1])
        if kind == "fstat":
            return _stat(os.fstat(self.fd(a[0])))
        if kind == "getfl":
            return fcntl.fcntl(self.fd(a[0]), fcntl.F_GETFL), fcntl.fcntl(self.fd(a[0]), fcntl.F_GETFD)
        if kind == "fsync":
            return os.fsync(self.fd(a[0]))
        if kind == "fallocate":
            return os.posix_fallocate(self.fd(a[0]), a[1], a[2])
        if kind == "getdents":
            return _getdents(self.fd(a[0]))
        if kind == "copy":
            return os.copy_file_range(self.fd(a[1]), self.fd(a[0]), a[2])
        if kind == "sendfile":
            return os.sendfile(self.fd(a[0]), self.fd(a[1]), None, a[2])
        if kind == "efault":  # write from / read into an unmapped address
            f = _libc.write if a[1] else _libc.read
            r = f(self.fd(a[0]), ctypes.c_void_p(4096), ctypes.c_size_t(16))
            if r < 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
            return r
        if kind in ("stat", "lstat"):
            return _stat(os.stat(a[0], follow_symlinks=kind == "stat"))
        if kind == "access":
            return os.access(a[0], a[1])
        if kind == "unlink":
            return os.unlink(a[0])
        if kind == "rmdir":
            return os.rmdir(a[0])
        if kind == "mkdir":
            return os.mkdir(a[0], a[1])
        if kind == "rename":
            return os.rename(a[0], a[1])
        if kind == "readlink":
            return os.readlink(a[0])
        if kind == "symlink":
            return os.symlink(a[0], a[1])
        if kind == "chmod":
            return os.chmod(a[0], a[1])
        if kind == "truncate":
            return os.truncate(a[0], a[1])
        raise ValueError(f"unknown op {kind}")


def ops_server(conn: Connection, root: str, sock: str | None) -> None:
    """A rank that runs op lists sent by the parent, each in a fresh directory under root.

    Inherited descriptors are closed first, so new descriptors are numbered from one
    contiguous free range in both modes.
    """
    keep = 4000
    os.dup2(conn.fileno(), keep)
    os.closerange(3, keep)
    conn = Connection(keep)
    ops = Ops(offloaded=sock is not None)
    session = attach(sock) if sock else None
    os.chdir(root)
    n = 0
    while True:
        msg = conn.recv()
        if msg is None:
            break
        n += 1
        case = f"case{n}"
        os.mkdir(case)
        os.chdir(case)
        os.umask(0o022)
        results = ops.run(msg)
        os.chdir(root)
        conn.send((case, results))
    conn.send(session.detach().tobytes() if session else b"")


def tree(path: Path) -> list[tuple]:
    """What a directory holds, for comparing two trees built by the same ops."""
    out = []
    for dirpath, dirnames, filenames in os.walk(path):
        rel = os.path.relpath(dirpath, path)
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            entry: tuple = (os.path.join(rel, name), stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode))
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    head = f.read(1 << 20)
                    f.seek(max(st.st_size - (1 << 20), 0))
                    tail = f.read()
                entry += (st.st_size, _digest(head), _digest(tail))
            elif stat.S_ISLNK(st.st_mode):
                entry += (os.readlink(p),)
            out.append(entry)
    return sorted(out)


def records_of(raw: bytes) -> Any:
    return accounting.from_bytes(raw)
