"""Scenarios of the offload fidelity suite, run as a plain program (standard library only).

    python3 fidelity_driver.py --user UID:GID DIR NAME...

runs each named scenario in a forked child, in the directory DIR/NAME, and prints one JSON
object {NAME: observations} as its last line. An observation is [label, value]; a failed call
is ["err", ERRNO_NAME]. The test suite runs the same command natively and as the child of
`mckmpi run --mode lwk` and compares the observations and the files left in DIR byte for
byte. Nothing here knows about mckmpi: it is the kind of program a user brings.

Observations never contain absolute paths or descriptor numbers that a correct run may
choose differently (a fresh descriptor above every open one); they do contain every number
POSIX fixes (the lowest free descriptor below an open one, dup2's target, F_DUPFD's bound).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import os
import signal
import stat
import struct
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.read.restype = ctypes.c_ssize_t
libc.read.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
OTHER_UID = 4242  # owner of "another user's" files; needs no passwd entry
SCENARIOS: dict[str, Callable[[Path, int, int], list[Any]]] = {}
#: scenarios that need root (privilege drops, mounts); the others run as any user
PRIVILEGED: set[str] = set()
#: scenarios that mean something only for an unprivileged user (root is exempt from quotas)
USER_ONLY: set[str] = set()


def scenario(privileged: bool = False, user_only: bool = False) -> Callable:
    def register(fn: Callable) -> Callable:
        name = fn.__name__.removeprefix("s_")
        SCENARIOS[name] = fn
        if privileged:
            PRIVILEGED.add(name)
        if user_only:
            USER_ONLY.add(name)
        return fn
    return register


class Obs(list):
    """The observations of one scenario."""

    def call(self, label: str, fn: Callable, *args: Any, keep: Callable = lambda r: r) -> Any:
        """Run fn(*args); record keep(result), or the errno's name; return the result or None."""
        try:
            r = fn(*args)
        except OSError as e:
            self.append([label, "err", errno.errorcode.get(e.errno, str(e.errno))])
            return None
        self.append([label, keep(r)])
        return r

    def note(self, label: str, value: Any) -> None:
        self.append([label, value])


def plain(value: Any) -> Any:
    """JSON for what calls return: bytes as text (latin-1 keeps every byte), the rest repr."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("latin-1")
    return repr(value)


def ok(_: Any) -> str:
    return "ok"


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def read_file(path: str | Path, dir_fd: int | None = None) -> bytes:
    fd = os.open(path, os.O_RDONLY, dir_fd=dir_fd)
    try:
        out = b""
        while chunk := os.read(fd, 1 << 16):
            out += chunk
        return out
    finally:
        os.close(fd)


def fd_open(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError:
        return False
    return True


def sh(cmd: str, cwd: Path, stdin: bytes = b"", timeout: float = 30) -> list[Any]:
    """A shell command line: its exit status, stdout and stderr (as text)."""
    r = subprocess.run(["/bin/sh", "-c", cmd], cwd=cwd, input=stdin, capture_output=True,
                       timeout=timeout, check=False)
    return [r.returncode, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")]


def in_child(fn: Callable[[], list[Any]]) -> list[Any]:
    """fn() in a forked child (for credential and descriptor changes that must not last)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.dup2(w, r)  # no hole where r was: a new file's number is a fresh one
        os.close(w)
        w = r
        try:
            out = fn()
        except BaseException as e:  # noqa: BLE001 -- report, then leave
            out = [["exception", f"{type(e).__name__}: {e}", traceback.format_exc()]]
        os.write(w, json.dumps(out, default=plain).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 1 << 16):
        data += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    out = json.loads(data) if data else []
    out.append(["child status", os.waitstatus_to_exitcode(status)])
    return out


# --- protected files of a root job ---------------------------------------------------------


def protected_tree(d: Path, gid: int) -> None:
    """Files a dropped child must not reach: root's, another user's, a group's, a sticky dir."""
    (d / "rootfile").write_bytes(b"root only\n")
    os.chmod(d / "rootfile", 0o600)
    (d / "other").write_bytes(b"another user's secret\n")
    os.chown(d / "other", OTHER_UID, OTHER_UID)
    os.chmod(d / "other", 0o600)
    (d / "group").write_bytes(b"group readable\n")
    os.chown(d / "group", 0, gid)
    os.chmod(d / "group", 0o640)
    (d / "rootdir").mkdir()
    (d / "rootdir" / "inside").write_bytes(b"in a root-owned dir\n")
    (d / "closed").mkdir(mode=0o700)
    (d / "closed" / "f").write_bytes(b"behind a 0700 dir\n")
    (d / "sticky").mkdir()
    os.chmod(d / "sticky", 0o1777)
    (d / "sticky" / "roots").write_bytes(b"root's file in a sticky dir\n")
    os.chmod(d / "sticky" / "roots", 0o666)
    os.chmod(d, 0o755)


def file_ops(obs: Obs, d: Path) -> None:
    """What an unprivileged task tries on `protected_tree` (and /etc/shadow): every result."""
    c = obs.call
    c("read other", read_file, d / "other", keep=digest)
    c("read rootfile", read_file, d / "rootfile", keep=digest)
    c("read group", read_file, d / "group", keep=digest)
    c("read /etc/shadow", read_file, "/etc/shadow", keep=ok)
    c("open /etc/shadow for append", os.open, "/etc/shadow", os.O_WRONLY | os.O_APPEND, keep=ok)
    c("write other", lambda: os.write(os.open(d / "other", os.O_WRONLY | os.O_APPEND), b"w\n"))
    c("write rootfile", lambda: os.write(os.open(d / "rootfile", os.O_WRONLY | os.O_APPEND),
                                         b"w\n"))
    c("stat closed/f", os.stat, d / "closed" / "f", keep=lambda s: s.st_size)
    c("access other R_OK", os.access, d / "other", os.R_OK)
    c("access rootfile W_OK", os.access, d / "rootfile", os.W_OK)
    c("create in rootdir", os.open, d / "rootdir" / "new", os.O_WRONLY | os.O_CREAT, 0o644,
      keep=ok)
    c("mkdir in rootdir", os.mkdir, d / "rootdir" / "sub")
    c("unlink in rootdir", os.unlink, d / "rootdir" / "inside")
    c("rename out of rootdir", os.rename, d / "rootdir" / "inside", d / "sticky" / "moved")
    c("truncate rootfile", os.truncate, d / "rootfile", 0)
    c("unlink root's file in sticky", os.unlink, d / "sticky" / "roots")
    c("open root's file in sticky O_CREAT", os.open, d / "sticky" / "roots",
      os.O_WRONLY | os.O_CREAT, 0o644, keep=ok)
    c("create own file in sticky", os.open, d / "sticky" / "mine", os.O_WRONLY | os.O_CREAT,
      0o644, keep=ok)
    c("listdir closed", os.listdir, d / "closed")


def become(uid: int, gid: int, groups: list[int] | None = None) -> None:
    os.setgroups(groups or [])
    os.setgid(gid)
    os.setuid(uid)


@scenario(privileged=True)
def s_setpriv(d: Path, uid: int, gid: int) -> list[Any]:
    """setpriv drops a root job's child to the user, then coreutils try the protected files."""
    protected_tree(d, gid)
    script = ("cat other; echo $?; cat rootfile; echo $?; cat /etc/shadow >/dev/null; echo $?; "
              "touch rootdir/new; echo $?; rm -f rootdir/inside; echo $?; mkdir rootdir/sub; "
              "echo $?; echo x >> rootfile; echo $?; rm -f sticky/roots; echo $?; "
              "cat closed/f; echo $?; ls closed; echo $?; touch sticky/mine; echo $?")
    return [sh(f"setpriv --reuid={uid} --regid={gid} --clear-groups /bin/sh -c '{script}'", d)]


@scenario(privileged=True)
def s_setuid(d: Path, uid: int, gid: int) -> list[Any]:
    """os.setuid in Python: every file call after the drop."""
    protected_tree(d, gid)

    def run() -> list[Any]:
        obs = Obs()
        become(uid, gid)
        file_ops(obs, d)
        return obs

    return in_child(run)


@scenario(privileged=True)
def s_setuid_groups(d: Path, uid: int, gid: int) -> list[Any]:
    """A drop that keeps a supplementary group: the group's file is readable, no other."""
    protected_tree(d, gid)
    group = 4243
    os.chown(d / "group", 0, group)

    def run() -> list[Any]:
        obs = Obs()
        become(uid, gid, [group])
        obs.call("read group", read_file, d / "group", keep=digest)
        obs.call("read other", read_file, d / "other", keep=digest)
        return obs

    return in_child(run)


@scenario(privileged=True)
def s_seteuid(d: Path, uid: int, gid: int) -> list[Any]:
    """Effective ids only (the real and saved stay root), then back to root."""
    protected_tree(d, gid)

    def run() -> list[Any]:
        obs = Obs()
        os.setegid(gid)
        os.seteuid(uid)
        file_ops(obs, d)  # access() checks the real uid: root's
        os.seteuid(0)
        os.setegid(0)
        obs.call("read other as root again", read_file, d / "other", keep=digest)
        obs.call("create in rootdir as root again", os.open, d / "rootdir" / "again",
                 os.O_WRONLY | os.O_CREAT, 0o600, keep=ok)
        return obs

    return in_child(run)


@scenario(privileged=True)
def s_setfsuid(d: Path, uid: int, gid: int) -> list[Any]:
    """setfsuid/setfsgid: only file system checks change."""
    protected_tree(d, gid)

    def run() -> list[Any]:
        obs = Obs()
        libc.setfsgid(gid)
        libc.setfsuid(uid)
        file_ops(obs, d)
        return obs

    return in_child(run)


CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER = 0, 1, 2, 3


def drop_caps(*caps: int) -> None:
    """capset(2): remove `caps` from the effective and permitted sets of this thread."""
    header = struct.pack("<Ii", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    data = ctypes.create_string_buffer(24)
    hdr = ctypes.create_string_buffer(header)
    if libc.syscall(125, hdr, data) != 0:  # capget
        raise OSError(ctypes.get_errno(), "capget")
    words = list(struct.unpack("<6I", data.raw))
    for cap in caps:
        words[0] &= ~(1 << cap)  # effective (low word)
        words[1] &= ~(1 << cap)  # permitted
    data = ctypes.create_string_buffer(struct.pack("<6I", *words))
    if libc.syscall(126, hdr, data) != 0:  # capset
        raise OSError(ctypes.get_errno(), "capset")


@scenario(privileged=True)
def s_capset(d: Path, uid: int, gid: int) -> list[Any]:
    """Root without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH/CAP_FOWNER, set with capset."""
    protected_tree(d, gid)

    def run() -> list[Any]:
        obs = Obs()
        drop_caps(CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER)
        file_ops(obs, d)
        return obs

    return in_child(run)


@scenario(privileged=True)
def s_capsh(d: Path, uid: int, gid: int) -> list[Any]:
    """capsh drops capabilities from the bounding set; the shell it execs lacks them."""
    protected_tree(d, gid)
    os.chmod(d / "rootdir", 0o555)
    return [sh("capsh --drop=cap_dac_override,cap_dac_read_search -- -c "
               "'cat other; echo $?; touch rootdir/new; echo $?; echo x >> other; echo $?; "
               "echo y >> rootfile; echo $?'", d)]


@scenario(privileged=True)
def s_chroot(d: Path, uid: int, gid: int) -> list[Any]:
    """A chrooted child sees its jail only, for reading and for creating."""
    (d / "jail" / "etc").mkdir(parents=True)
    (d / "jail" / "etc" / "hostname").write_bytes(b"jail\n")
    (d / "outside").write_bytes(b"outside the jail\n")

    def run() -> list[Any]:
        obs = Obs()
        os.chroot(d / "jail")
        os.chdir("/")
        obs.call("read /etc/hostname", read_file, "/etc/hostname")
        obs.call("read outside by its real path", read_file, str(d / "outside"), keep=digest)
        obs.call("create by a real path", os.open, str(d / "escaped"), os.O_WRONLY | os.O_CREAT,
                 0o644, keep=ok)
        obs.call("create /inside", os.open, "/inside", os.O_WRONLY | os.O_CREAT, 0o644, keep=ok)
        obs.call("listdir /", lambda: sorted(os.listdir("/")))
        obs.call("stat /etc/shadow", os.stat, "/etc/shadow", keep=ok)
        obs.call("mkdir /made", os.mkdir, "/made")
        obs.call("relative ../../outside", read_file, "../../outside", keep=digest)
        obs.call("append to outside by its real path", os.open, str(d / "outside"),
                 os.O_WRONLY | os.O_APPEND, keep=ok)
        obs.call("append to the jail's /etc/hostname",
                 lambda: os.write(os.open("/etc/hostname", os.O_WRONLY | os.O_APPEND), b"more\n"))
        return obs

    return in_child(run)


@scenario(privileged=True)
def s_unshare_mount(d: Path, uid: int, gid: int) -> list[Any]:
    """A child in its own mount namespace writes to a tmpfs only it can see."""
    (d / "m").mkdir()

    def run() -> list[Any]:
        obs = Obs()
        if libc.unshare(0x00020000) != 0:  # CLONE_NEWNS
            raise OSError(ctypes.get_errno(), "unshare")
        if libc.mount(b"none", b"/", None, 0x4000 | 0x40000, None) != 0:  # MS_REC | MS_PRIVATE
            raise OSError(ctypes.get_errno(), "mount --make-rprivate /")
        if libc.mount(b"tmpfs", str(d / "m").encode(), b"tmpfs", 0, b"size=1m") != 0:
            raise OSError(ctypes.get_errno(), "mount tmpfs")
        obs.call("write on the private tmpfs", Path(d / "m" / "f").write_bytes, b"private\n")
        obs.call("read it back", read_file, d / "m" / "f")
        obs.call("statfs type is tmpfs", lambda: os.statvfs(d / "m").f_blocks > 0)
        return obs

    return in_child(run)


# --- limits ----------------------------------------------------------------------------------


@scenario()
def s_rlimit_fsize(d: Path, uid: int, gid: int) -> list[Any]:
    """RLIMIT_FSIZE: EFBIG with SIGXFSZ ignored, death by SIGXFSZ otherwise."""
    import resource

    def run() -> list[Any]:
        obs = Obs()
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        fd = os.open(d / "big", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        for i in range(10):
            obs.call(f"write {i}", os.write, fd, bytes([65 + i]) * 401)
        obs.call("pwrite past the limit", os.pwrite, fd, b"x", 2000)
        obs.call("ftruncate past the limit", os.ftruncate, fd, 5000)
        obs.call("truncate past the limit", os.truncate, d / "big", 5000)
        os.close(fd)
        obs.call("size", lambda: os.stat(d / "big").st_size)
        return obs

    out = in_child(run)
    out.append(sh("ulimit -f 1; head -c 4010 /dev/zero > killed; echo $?; wc -c < killed", d))
    return out


@scenario()
def s_rlimit_nofile(d: Path, uid: int, gid: int) -> list[Any]:
    """A lowered RLIMIT_NOFILE: EMFILE at the same count."""
    import resource

    (d / "f").write_bytes(b"x")

    def run() -> list[Any]:
        obs = Obs()
        resource.setrlimit(resource.RLIMIT_NOFILE, (32, 32))
        fds = []
        while True:
            try:
                fds.append(os.open(d / "f", os.O_RDONLY))
            except OSError as e:
                obs.note("stopped with", errno.errorcode[e.errno])
                break
        obs.note("opened", len(fds))
        obs.note("all below the limit", all(fd < 32 for fd in fds))
        return obs

    return in_child(run)


@scenario()
def s_umask(d: Path, uid: int, gid: int) -> list[Any]:
    """umask per process, changed between creations, and in a forked child."""
    def run() -> list[Any]:
        obs = Obs()
        os.umask(0o077)
        os.close(os.open(d / "a", os.O_WRONLY | os.O_CREAT, 0o666))
        os.mkdir(d / "da", 0o777)
        os.umask(0o002)
        os.close(os.open(d / "b", os.O_WRONLY | os.O_CREAT, 0o666))
        pid = os.fork()
        if pid == 0:
            os.umask(0o027)
            os.close(os.open(d / "c", os.O_WRONLY | os.O_CREAT, 0o666))
            os._exit(0)
        os.waitpid(pid, 0)
        os.close(os.open(d / "e", os.O_WRONLY | os.O_CREAT, 0o666))
        return obs

    return in_child(run)


# --- paths that name the caller --------------------------------------------------------------


def links(d: Path) -> None:
    """Symlinks into /proc/self, /proc/thread-self, /dev/fd and /dev/std*, at several depths."""
    os.symlink("/proc/self", d / "self")
    os.symlink("self", d / "self2")
    (d / "sub").mkdir()
    os.symlink("../self2", d / "sub" / "self3")
    os.symlink("/proc/thread-self", d / "tself")
    os.symlink("/dev/fd", d / "devfd")
    os.symlink("/dev", d / "dev")
    os.symlink("/dev/stdin", d / "stdin")
    os.symlink("/dev/stdout", d / "stdout")
    os.symlink("/proc", d / "proc")


def pid_line(data: bytes) -> bool:
    for line in data.splitlines():
        if line.startswith(b"Pid:"):
            return int(line.split()[1]) == os.getpid()
    return False


@scenario()
def s_proc_self(d: Path, uid: int, gid: int) -> list[Any]:
    """/proc/self through symlinks: the caller's status, exe, cwd, fds -- never the proxy's."""
    links(d)
    (d / "data").write_bytes(b"the caller's file\n")

    def run() -> list[Any]:
        obs = Obs()
        fd = os.open(d / "data", os.O_RDONLY)
        os.chdir(d)
        for via in ("self", "self2", "sub/self3", "proc/self"):
            obs.call(f"{via}/status is mine", read_file, f"{via}/status", keep=pid_line)
            obs.call(f"{via}/exe", lambda v=via: os.readlink(f"{v}/exe") == os.readlink("/proc/self/exe"))
            obs.call(f"{via}/cwd", lambda v=via: os.readlink(f"{v}/cwd") == os.getcwd())
            obs.call(f"{via}/fd/N", read_file, f"{via}/fd/{fd}")
            obs.call(f"stat {via}/fd/N", lambda v=via: os.stat(f"{v}/fd/{fd}").st_ino
                     == os.fstat(fd).st_ino)
            obs.call(f"{via}/fd listing", lambda v=via: sorted(os.listdir(f"{v}/fd"))
                     == sorted(os.listdir("/proc/self/fd")))
            obs.call(f"{via}/fd/9999", read_file, f"{via}/fd/9999")
            obs.call(f"access {via}/fd/N", os.access, f"{via}/fd/{fd}", os.R_OK)
            obs.call(f"{via}/comm", read_file, f"{via}/comm")
        obs.call("readlink self", os.readlink, "self")
        obs.call("my other fds are not reachable",
                 lambda: [os.path.exists(f"self/fd/{n}") == os.path.exists(f"/proc/self/fd/{n}")
                          for n in range(3, 40)])
        return obs

    return in_child(run)


@scenario()
def s_thread_self(d: Path, uid: int, gid: int) -> list[Any]:
    """/proc/thread-self through a symlink, from two threads with their own names."""
    links(d)

    def run() -> list[Any]:
        obs = Obs()
        os.chdir(d)
        obs.call("main thread comm", read_file, "tself/comm")
        box: list[Any] = []

        def other() -> None:
            libc.prctl(15, b"fidelity-t2", 0, 0, 0)  # PR_SET_NAME
            try:
                box.append(read_file("tself/comm").decode())
                box.append(os.stat("tself/stat").st_size)
            except OSError as e:
                box.append(errno.errorcode[e.errno])

        t = threading.Thread(target=other)
        t.start()
        t.join()
        obs.note("second thread", box)
        return obs

    return in_child(run)


@scenario()
def s_dev_fd(d: Path, uid: int, gid: int) -> list[Any]:
    """/dev/fd/N and /dev/stdin through symlinks: the caller's descriptors."""
    links(d)
    (d / "data").write_bytes(b"0123456789")

    def run() -> list[Any]:
        obs = Obs()
        os.chdir(d)
        fd = os.open("data", os.O_RDWR)
        os.lseek(fd, 4, os.SEEK_SET)
        os.symlink(f"/dev/fd/{fd}", "direct")
        for via in ("devfd", "dev/fd", "proc/self/fd", "self/fd"):
            obs.call(f"read {via}/N", read_file, f"{via}/{fd}")
        obs.call("read direct", read_file, "direct")
        w = obs.call("open direct for writing", os.open, "direct", os.O_WRONLY | os.O_APPEND,
                     keep=ok)
        if w is not None:
            os.write(w, b"+appended")
            os.close(w)
        obs.call("stat dev/fd/N", lambda: os.stat(f"dev/fd/{fd}").st_ino == os.fstat(fd).st_ino)
        obs.call("read /dev/fd/N", read_file, f"/dev/fd/{fd}")
        os.unlink("direct")  # its target holds a fresh descriptor number (no program's choice)
        r, w2 = os.pipe()
        os.write(w2, b"from the pipe\n")
        os.close(w2)
        os.dup2(r, 0)
        obs.call("read stdin link", read_file, "stdin")
        obs.call("stat stdin link is a fifo", lambda: stat.S_ISFIFO(os.stat("stdin").st_mode))
        return obs

    return in_child(run)


# --- O_PATH and failures ---------------------------------------------------------------------


@scenario()
def s_o_path(d: Path, uid: int, gid: int) -> list[Any]:
    """O_PATH opens work, and are what they are natively."""
    (d / "f").write_bytes(b"payload")
    os.symlink("f", d / "ln")
    (d / "dir").mkdir()

    def run() -> list[Any]:
        obs = Obs()
        fd = obs.call("open O_PATH", os.open, d / "f", os.O_PATH, keep=ok)
        if fd is not None:
            obs.call("fstat", lambda: os.fstat(fd).st_size)
            obs.call("read", os.read, fd, 4)
            obs.call("getfl has O_PATH", lambda: bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_PATH))
            obs.call("reopen through /proc/self/fd", read_file, f"/proc/self/fd/{fd}")
        lfd = obs.call("open symlink O_PATH|O_NOFOLLOW", os.open, d / "ln",
                       os.O_PATH | os.O_NOFOLLOW, keep=ok)
        if lfd is not None:
            obs.call("it is the link", lambda: stat.S_ISLNK(os.fstat(lfd).st_mode))
            obs.call("readlink through it", lambda: os.readlink("", dir_fd=lfd))
        dfd = obs.call("open dir O_PATH", os.open, d / "dir", os.O_PATH | os.O_DIRECTORY, keep=ok)
        if dfd is not None:
            obs.call("create relative to it", lambda: os.close(os.open(
                "new", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=dfd)))
            obs.call("stat relative to it", lambda: os.stat("new", dir_fd=dfd).st_size)
        obs.call("O_PATH of a missing file", os.open, d / "missing", os.O_PATH, keep=ok)
        return obs

    return in_child(run)


@scenario()
def s_no_number_burnt(d: Path, uid: int, gid: int) -> list[Any]:
    """Thousands of failed and O_PATH opens leave the process able to open files."""
    (d / "f").write_bytes(b"x")
    (d / "dir").mkdir()

    def run() -> list[Any]:
        obs = Obs()
        errors: dict[str, int] = {}
        for i in range(1500):
            for path, flags in ((d / "missing", os.O_RDONLY), (d / "dir", os.O_WRONLY),
                                (d / "f", os.O_PATH)):
                try:
                    os.close(os.open(path, flags))
                    errors["ok"] = errors.get("ok", 0) + 1
                except OSError as e:
                    name = errno.errorcode[e.errno]
                    errors[name] = errors.get(name, 0) + 1
        obs.note("results", errors)
        obs.call("then an open works", lambda: read_file(d / "f"))
        return obs

    return in_child(run)


# --- descriptor numbering --------------------------------------------------------------------


@scenario()
def s_numbering(d: Path, uid: int, gid: int) -> list[Any]:
    """dup, F_DUPFD(_CLOEXEC), dup2, dup3: the numbers programs count on (a free standard
    stream, dup2's target, F_DUPFD's lower bound), offloaded descriptors or not."""
    def run() -> list[Any]:
        obs = Obs()
        f = os.open(d / "f", os.O_RDWR | os.O_CREAT, 0o644)
        os.write(f, b"abc")
        r, w = os.pipe()
        os.close(0)
        obs.call("dup after close(0)", libc.dup, f)
        os.close(2)
        obs.call("F_DUPFD 0 after close(2)", fcntl.fcntl, f, fcntl.F_DUPFD, 0)
        os.close(1)
        obs.call("F_DUPFD_CLOEXEC 1 after close(1)", fcntl.fcntl, f, fcntl.F_DUPFD_CLOEXEC, 1)
        obs.call("... and is close-on-exec", fcntl.fcntl, 1, fcntl.F_GETFD)
        os.close(r)
        obs.call("dup is a free number", lambda: libc.dup(f) not in (0, 1, 2, f, w))
        obs.call("F_DUPFD >= the closed pipe end", lambda: fcntl.fcntl(f, fcntl.F_DUPFD, r) >= r)
        obs.call("F_DUPFD 100 >= 100", lambda: fcntl.fcntl(f, fcntl.F_DUPFD, 100) >= 100)
        obs.call("dup2 to 50", os.dup2, f, 50)
        obs.call("dup2 to itself", os.dup2, f, f, keep=lambda n: n == f)
        obs.call("dup2 onto a pipe end", os.dup2, f, w, keep=lambda n: n == w)
        obs.call("dup3 O_CLOEXEC to 60", lambda: libc.syscall(292, f, 60, os.O_CLOEXEC))
        obs.call("60 is close-on-exec", lambda: fcntl.fcntl(60, fcntl.F_GETFD))
        obs.call("dup3 to itself", lambda: libc.syscall(292, f, f, 0) == -1 and ctypes.get_errno())
        obs.call("dup of a closed fd", os.dup, 77)
        obs.call("dup2 to a negative", os.dup2, f, -2)
        # all these share one offset
        os.lseek(50, 0, os.SEEK_SET)
        obs.call("read via 60", os.read, 60, 10)
        obs.call("offset via f", os.lseek, f, 0, os.SEEK_CUR)
        os.write(w, b"d")  # w is the file now
        os.write(0, b"e")  # so is the standard input
        obs.call("content", read_file, d / "f")
        os.close(50)
        obs.call("F_DUPFD 50 after closing 50", lambda: fcntl.fcntl(f, fcntl.F_DUPFD, 50) >= 50)
        return obs

    return in_child(run)


@scenario()
def s_redirect_stdout(d: Path, uid: int, gid: int) -> list[Any]:
    """close(1); dup(f) makes f the standard output, for this process and a child it execs."""
    def run() -> list[Any]:
        obs = Obs()
        f = os.open(d / "out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        saved = os.dup(1)
        os.close(1)
        got = libc.dup(f)  # dup(2) itself: Python's os.dup would add close-on-exec
        os.write(1, b"through fd 1\n")
        subprocess.run(["/bin/echo", "from a child's stdout"], check=False)
        os.dup2(saved, 1)
        obs.note("dup gave 1", got == 1)
        os.close(0)
        g = os.open(d / "out", os.O_RDONLY)
        obs.note("open after close(0) gave 0", g == 0)
        obs.call("read from 0", os.read, 0, 100)
        os.close(2)
        h = os.open(d / "err", os.O_WRONLY | os.O_CREAT, 0o600)
        obs.note("open after close(2) gave 2", h == 2)
        os.write(2, b"error text\n")
        return obs

    return in_child(run)


# --- everything else -------------------------------------------------------------------------


@scenario()
def s_signals_during_reads(d: Path, uid: int, gid: int) -> list[Any]:
    """A 200 us timer with an SA_RESTART handler during thousands of reads: no EINTR, no
    lost or doubled bytes."""
    data = hashlib.shake_256(b"fidelity").digest(1 << 20)
    (d / "f").write_bytes(data)

    def run() -> list[Any]:
        obs = Obs()
        ticks = [0]

        def tick(*_: Any) -> None:
            ticks[0] += 1

        signal.signal(signal.SIGALRM, tick)
        signal.siginterrupt(signal.SIGALRM, False)  # SA_RESTART
        fd = os.open(d / "f", os.O_RDONLY)
        buf = ctypes.create_string_buffer(512)
        got = bytearray()
        results = {"eintr": 0, "short": 0}
        signal.setitimer(signal.ITIMER_REAL, 0.0002, 0.0002)
        while True:
            n = libc.read(fd, buf, 512)  # ctypes: no retry by Python
            if n < 0:
                results["eintr" if ctypes.get_errno() == errno.EINTR else "other"] = 1
                continue
            if n == 0:
                break
            if n != 512:
                results["short"] += 1
            got += buf.raw[:n]
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        obs.note("results", results)
        obs.note("data intact", bytes(got) == data)
        return obs

    return in_child(run)


@scenario()
def s_cloexec_and_exec(d: Path, uid: int, gid: int) -> list[Any]:
    """O_CLOEXEC descriptors vanish at exec, the others survive with their offset."""
    (d / "f").write_bytes(b"0123456789")

    def run() -> list[Any]:
        obs = Obs()
        keep = os.open(d / "f", os.O_RDONLY)
        gone = os.open(d / "f", os.O_RDONLY | os.O_CLOEXEC)
        os.set_inheritable(keep, True)
        os.lseek(keep, 3, os.SEEK_SET)
        code = ("import os,sys; k,g=map(int,sys.argv[1:]); "
                "print(os.read(k,4), os.lseek(k,0,1)); "
                "print([os.path.exists(f'/proc/self/fd/{n}') for n in (k,g)])")
        r = subprocess.run([sys.executable, "-c", code, str(keep), str(gone)], close_fds=False,
                           capture_output=True, check=False)
        obs.note("exec'd child", [r.returncode, r.stdout.decode(), r.stderr.decode()[-300:]])
        obs.call("offset moved by the child", os.lseek, keep, 0, os.SEEK_CUR)
        return obs

    return in_child(run)


@scenario()
def s_fork_shared_offset(d: Path, uid: int, gid: int) -> list[Any]:
    """A forked child shares the open file description: one offset, one file."""
    def run() -> list[Any]:
        obs = Obs()
        fd = os.open(d / "f", os.O_RDWR | os.O_CREAT, 0o644)
        os.write(fd, b"parent1 ")
        pid = os.fork()
        if pid == 0:
            os.write(fd, b"child ")
            os.lseek(fd, 2, os.SEEK_CUR)
            os.close(fd)
            os._exit(0)
        os.waitpid(pid, 0)
        obs.call("offset after the child", os.lseek, fd, 0, os.SEEK_CUR)
        os.write(fd, b"parent2")
        obs.call("fstat size", lambda: os.fstat(fd).st_size)
        return obs

    return in_child(run)


@scenario()
def s_append_two_processes(d: Path, uid: int, gid: int) -> list[Any]:
    """Two processes with their own O_APPEND descriptors, taking turns: nothing overwritten."""
    def run() -> list[Any]:
        obs = Obs()
        a_r, a_w = os.pipe()
        b_r, b_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            fd = os.open(d / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            for i in range(200):
                os.read(a_r, 1)
                os.write(fd, f"child {i}\n".encode())
                os.write(b_w, b".")
            os._exit(0)
        fd = os.open(d / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        for i in range(200):
            os.write(fd, f"parent {i}\n".encode())
            os.pwrite(fd, b"P", 0)  # O_APPEND: pwrite appends on Linux
            os.write(a_w, b".")
            os.read(b_r, 1)
        os.waitpid(pid, 0)
        obs.call("size", lambda: os.fstat(fd).st_size)
        return obs

    return in_child(run)


@scenario()
def s_locks(d: Path, uid: int, gid: int) -> list[Any]:
    """fcntl record locks, OFD locks and flock between two processes."""
    (d / "f").write_bytes(b"x" * 100)

    def run() -> list[Any]:
        obs = Obs()
        fd = os.open(d / "f", os.O_RDWR)
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 0)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            out = []
            c = os.open(d / "f", os.O_RDWR)
            for how in (lambda: fcntl.lockf(c, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 0),
                        lambda: fcntl.lockf(c, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 20),
                        lambda: fcntl.flock(c, fcntl.LOCK_EX | fcntl.LOCK_NB)):
                try:
                    how()
                    out.append("ok")
                except OSError as e:
                    out.append(errno.errorcode[e.errno])
            lk = struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 10, 0)
            got = struct.unpack("hhqqi", fcntl.fcntl(c, fcntl.F_GETLK, lk + b"\0" * 4)[:28])
            out.append([got[0] == fcntl.F_WRLCK, got[4] == os.getppid()])
            os.write(w, json.dumps(out).encode())
            os._exit(0)
        os.close(w)
        os.waitpid(pid, 0)
        obs.note("child saw", json.loads(os.read(r, 4096)))
        # closing any descriptor of the file drops this process's record locks
        other = os.open(d / "f", os.O_RDONLY)
        os.close(other)
        pid = os.fork()
        if pid == 0:
            c = os.open(d / "f", os.O_RDWR)
            try:
                fcntl.lockf(c, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 0)
                os._exit(0)
            except OSError:
                os._exit(1)
        obs.note("lock gone after closing another fd", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
        return obs

    return in_child(run)


@scenario()
def s_sparse_and_large(d: Path, uid: int, gid: int) -> list[Any]:
    """Holes, SEEK_DATA/SEEK_HOLE, and offsets beyond 4 GiB."""
    def run() -> list[Any]:
        obs = Obs()
        fd = os.open(d / "sparse", os.O_RDWR | os.O_CREAT, 0o644)
        os.lseek(fd, 1 << 20, os.SEEK_SET)
        os.write(fd, b"data")
        obs.call("SEEK_DATA", os.lseek, fd, 0, os.SEEK_DATA)
        obs.call("SEEK_HOLE", os.lseek, fd, 0, os.SEEK_HOLE)
        obs.call("blocks", lambda: os.fstat(fd).st_blocks)
        big = os.open(d / "big", os.O_RDWR | os.O_CREAT, 0o644)
        far = (5 << 30) + 7
        obs.call("pwrite at 5 GiB", os.pwrite, big, b"far away", far)
        obs.call("size", lambda: os.fstat(big).st_size)
        obs.call("pread at 5 GiB", os.pread, big, 8, far)
        obs.call("lseek SEEK_END", os.lseek, big, 0, os.SEEK_END)
        obs.call("ftruncate to 4 GiB + 1", os.ftruncate, big, (4 << 30) + 1)
        obs.call("stat size", lambda: os.stat(d / "big").st_size)
        obs.call("read at 4 GiB", lambda: (os.lseek(big, 4 << 30, os.SEEK_SET), os.read(big, 10))[1])
        os.ftruncate(big, 0)
        return obs

    return in_child(run)


@scenario()
def s_name_lengths(d: Path, uid: int, gid: int) -> list[Any]:
    """NAME_MAX and PATH_MAX, exactly at and one past the limit."""
    def run() -> list[Any]:
        obs = Obs()
        os.chdir(d)
        obs.call("name of 255", lambda: os.close(os.open("n" * 255, os.O_CREAT | os.O_WRONLY, 0o644)))
        obs.call("name of 256", os.open, "n" * 256, os.O_CREAT | os.O_WRONLY, 0o644, keep=ok)
        obs.call("stat name of 256", os.stat, "m" * 256, keep=ok)
        obs.call("mkdir name of 256", os.mkdir, "m" * 256)
        path = "p" * 200
        os.mkdir(path)
        while 4095 - len(path) - 1 > 255:  # the last name must fit NAME_MAX
            path += "/" + "p" * min(200, 4095 - len(path) - 1 - 100)
            os.mkdir(path)
        fill = 4095 - len(path) - 1
        at_max = path + "/" + "f" * fill           # 4095 bytes + NUL = PATH_MAX
        obs.note("lengths", [len(at_max), len(at_max) + 1])
        obs.call("create at PATH_MAX - 1", lambda: os.close(os.open(at_max, os.O_CREAT | os.O_WRONLY, 0o644)))
        obs.call("stat at PATH_MAX - 1", lambda: os.stat(at_max).st_size)
        obs.call("open at PATH_MAX", os.open, at_max + "g", os.O_CREAT | os.O_WRONLY, 0o644, keep=ok)
        obs.call("stat at PATH_MAX", os.stat, at_max + "g", keep=ok)
        obs.call("unlink at PATH_MAX", os.unlink, at_max + "g")
        obs.call("absolute path at PATH_MAX - 1", os.stat, "/" * (4095 - len(str(d)) - 2)
                 + str(d) + "/x", keep=ok)
        obs.call("absolute path at PATH_MAX", os.stat, "/" * (4096 - len(str(d)) - 2) + str(d)
                 + "/x", keep=ok)
        return obs

    return in_child(run)


def fill(obs: Obs, path: Path, byte: bytes) -> tuple[int, int]:
    """Write 64 KiB chunks to a new `path` until the file system refuses; the observation
    "written until" [bytes, errno name], and the open descriptor and byte count."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    total, chunk, err = 0, byte * 65536, None
    while True:
        try:
            total += os.write(fd, chunk)
        except OSError as e:
            err = errno.errorcode[e.errno]
            break
    obs.note("written until", [total, err])
    return fd, total


@scenario()
def s_enospc_erofs(d: Path, uid: int, gid: int) -> list[Any]:
    """A full file system and a read-only one (both mounted by the test as `small`, `ro`)."""
    def run() -> list[Any]:
        obs = Obs()
        if not (d / "small").is_mount() or not (d / "ro").is_mount():
            obs.note("mounts missing", True)
            return obs
        fd, _ = fill(obs, d / "small" / "fill", b"z")
        obs.call("fallocate beyond", os.posix_fallocate, fd, 0, 1 << 30)
        obs.call("create another", lambda: os.write(os.open(d / "small" / "g", os.O_WRONLY | os.O_CREAT, 0o644), b"x" * 8192))
        obs.call("create on ro", os.open, d / "ro" / "new", os.O_WRONLY | os.O_CREAT, 0o644, keep=ok)
        obs.call("open ro file for writing", os.open, d / "ro" / "file", os.O_WRONLY, keep=ok)
        obs.call("read ro file", read_file, d / "ro" / "file")
        obs.call("mkdir on ro", os.mkdir, d / "ro" / "dir")
        obs.call("unlink on ro", os.unlink, d / "ro" / "file")
        obs.call("truncate on ro", os.truncate, d / "ro" / "file", 0)
        obs.call("access W_OK on ro", os.access, d / "ro" / "file", os.W_OK)
        return obs

    return in_child(run)


@scenario(user_only=True)
def s_edquot(d: Path, uid: int, gid: int) -> list[Any]:
    """A user over its disk quota (the test mounts `quota`, limited to 1 MiB): writes, an
    allocation and a creation fail with EDQUOT after the same bytes."""
    def run() -> list[Any]:
        obs = Obs()
        q = d / "quota"
        if not q.is_mount():
            obs.note("quota mount missing", True)
            return obs
        fd, total = fill(obs, q / "fill", b"q")
        obs.call("one byte more", os.write, fd, b"q")
        obs.call("pwrite beyond the end", os.pwrite, fd, b"p" * 8192, total + 4096)
        obs.call("fallocate beyond", os.posix_fallocate, fd, 0, 4 << 20)
        obs.call("create another", lambda: os.write(os.open(q / "g", os.O_WRONLY | os.O_CREAT,
                                                            0o644), b"g" * 8192))
        obs.call("fsync", os.fsync, fd)
        obs.call("size", lambda: os.fstat(fd).st_size)
        os.close(fd)
        return obs

    return in_child(run)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--list"]:
        print(json.dumps({"all": sorted(SCENARIOS), "privileged": sorted(PRIVILEGED),
                          "user_only": sorted(USER_ONLY)}))
        return 0
    if len(argv) < 3 or argv[0] != "--user":
        print(__doc__, file=sys.stderr)
        return 2
    uid, gid = map(int, argv[1].split(":"))
    base = Path(argv[2])
    results = {}
    for name in argv[3:]:
        d = base / name
        d.mkdir(exist_ok=True)
        signal.alarm(120)
        results[name] = SCENARIOS[name](d, uid, gid)
        signal.alarm(0)
    sys.stdout.flush()
    print(json.dumps(results, default=plain))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
