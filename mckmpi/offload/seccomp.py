"""Kernel interface of seccomp user notification: layouts, ioctls, the filter, probes.

Nothing here decides *what* is offloaded (that is `syscalls`); this module only turns the
table into BPF, installs it, and names the structures and ioctls the proxy and the rank use.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import platform
import signal
import socket
import struct
from typing import Any

from mckmpi import linux
from mckmpi.errors import FeatureUnavailable
from mckmpi.linux import check, libc, syscall
from mckmpi.offload import syscalls
from mckmpi.offload.syscalls import FD_LIMIT, Syscall

# --- constants (linux/seccomp.h, linux/prctl.h) ------------------------------------------------

SYS_SECCOMP = 317
SYS_PIDFD_OPEN = 434
SYS_PIDFD_GETFD = 438
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_GET_NOTIF_SIZES = 3

FILTER_FLAG_TSYNC = 1 << 0
FILTER_FLAG_SPEC_ALLOW = 1 << 2
FILTER_FLAG_NEW_LISTENER = 1 << 3
FILTER_FLAG_TSYNC_ESRCH = 1 << 4
FILTER_FLAG_WAIT_KILLABLE_RECV = 1 << 5

RET_ALLOW = 0x7FFF0000
RET_USER_NOTIF = 0x7FC00000

USER_NOTIF_FLAG_CONTINUE = 1
ADDFD_FLAG_SETFD = 1
ADDFD_FLAG_SEND = 2

PR_SET_NO_NEW_PRIVS = 38
PR_SET_PTRACER = 0x59616D61


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (ord("!") << 8) | nr


# struct seccomp_notif { u64 id; u32 pid; u32 flags; struct seccomp_data data; }
# struct seccomp_data { int nr; u32 arch; u64 instruction_pointer; u64 args[6]; }
NOTIF = struct.Struct("<QIIiIQ6Q")
# struct seccomp_notif_resp { u64 id; s64 val; s32 error; u32 flags; }
NOTIF_RESP = struct.Struct("<QqiI")
# struct seccomp_notif_addfd { u64 id; u32 flags; u32 srcfd; u32 newfd; u32 newfd_flags; }
NOTIF_ADDFD = struct.Struct("<QIIII")
SECCOMP_DATA_SIZE = 64

IOCTL_NOTIF_RECV = _ioc(3, 0, NOTIF.size)
IOCTL_NOTIF_SEND = _ioc(3, 1, NOTIF_RESP.size)
IOCTL_NOTIF_ID_VALID = _ioc(1, 2, 8)
IOCTL_NOTIF_ADDFD = _ioc(1, 3, NOTIF_ADDFD.size)

#: A zeroed receive buffer: the kernel refuses a seccomp_notif that is not all zeros.
NOTIF_ZERO = bytes(NOTIF.size)

# --- BPF -----------------------------------------------------------------------------------------

_BPF_LD_W_ABS = 0x20
_BPF_JEQ_K = 0x15
_BPF_JGE_K = 0x35
_BPF_RET_K = 0x06
_OFF_NR = 0
_OFF_ARCH = 4


def _off_arg_low(i: int) -> int:
    """Offset of the low 32 bits of args[i] (little endian)."""
    return 16 + 8 * i


def _insn(code: int, jt: int, jf: int, k: int) -> tuple[int, int, int, int]:
    return (code, jt, jf, k)


def build_filter(fd_base: int, table: dict[str, Syscall] | None = None,
                 arch: int | None = None) -> bytes:
    """The BPF program (array of struct sock_filter) for the table and `fd_base`.

    Layout: wrong arch -> ALLOW (a 32-bit int 0x80 call has other numbers; letting it run
    natively is correct, trapping it would be wrong); path/observe/identity calls ->
    USER_NOTIF (an identity row with ``arg_in`` only for the listed argument values); fd
    calls jump to a per-signature block that returns USER_NOTIF iff one of their fd arguments
    (low 32 bits, as a C int) lies in [fd_base, 2**31) or, with ``also_below``, its first one
    below that number -- and, for a row with ``arg_in``, the named argument has one of the
    listed values; everything else ALLOW. The kernel
    ignores the high 32 bits of an fd argument, so the filter does too.
    """
    table = table if table is not None else syscalls.table()
    arch = arch if arch is not None else syscalls.audit_arch()
    if not 0 < fd_base < FD_LIMIT:
        raise ValueError(f"fd_base {fd_base} out of range")
    always = sorted(r.nr for r in table.values()
                    if r.kind in ("path", "observe") or (r.kind == "identity" and not r.arg_in))
    when = sorted((r.nr, r.arg_in) for r in table.values() if r.kind == "identity" and r.arg_in)
    groups: dict[tuple[Any, ...], list[int]] = {}
    for r in table.values():
        if r.kind == "fd":
            groups.setdefault((r.fd_args, r.arg_in, r.also_below), []).append(r.nr)
    # Symbolic program: jumps name labels, resolved to relative offsets below.
    prog: list[tuple[int, Any, Any, int]] = [
        (_BPF_LD_W_ABS, 0, 0, _OFF_ARCH),
        (_BPF_JEQ_K, 0, "allow", arch),
        (_BPF_LD_W_ABS, 0, 0, _OFF_NR),
    ]
    prog += [(_BPF_JEQ_K, "notify", 0, nr) for nr in always]
    prog += [(_BPF_JEQ_K, f"w{nr}", 0, nr) for nr, _ in when]
    keys = sorted(groups, key=repr)
    for key in keys:
        prog += [(_BPF_JEQ_K, f"g{key}", 0, nr) for nr in sorted(groups[key])]
    prog.append((_BPF_RET_K, 0, 0, RET_ALLOW))
    labels: dict[str, int] = {}
    for nr, (index, values) in when:  # notify only for the listed values of one argument
        labels[f"w{nr}"] = len(prog)
        prog.append((_BPF_LD_W_ABS, 0, 0, _off_arg_low(index)))
        prog += [(_BPF_JEQ_K, "notify", 0, v) for v in values]
        prog.append((_BPF_RET_K, 0, 0, RET_ALLOW))
    for key in keys:
        fd_args, arg_in, below = key
        hit = "notify" if arg_in is None else f"g{key}.cond"
        labels[f"g{key}"] = len(prog)
        for i, arg in enumerate(fd_args):
            last = i == len(fd_args) - 1
            miss = "allow" if last else f"g{key}.{i + 1}"
            if i:
                labels[f"g{key}.{i}"] = len(prog)
            prog.append((_BPF_LD_W_ABS, 0, 0, _off_arg_low(arg)))
            if below and not i:  # also a low descriptor (a standard stream)
                prog.append((_BPF_JGE_K, 0, "notify", below))
            prog += [
                (_BPF_JGE_K, 0, miss, fd_base),
                (_BPF_JGE_K, miss, hit, FD_LIMIT),
            ]
        if arg_in is not None:
            index, values = arg_in
            labels[hit] = len(prog)
            prog.append((_BPF_LD_W_ABS, 0, 0, _off_arg_low(index)))
            prog += [(_BPF_JEQ_K, "notify", 0, v) for v in values]
            prog.append((_BPF_RET_K, 0, 0, RET_ALLOW))
    labels["allow"] = len(prog)
    prog.append((_BPF_RET_K, 0, 0, RET_ALLOW))
    labels["notify"] = len(prog)
    prog.append((_BPF_RET_K, 0, 0, RET_USER_NOTIF))

    def rel(target: Any, pc: int) -> int:
        if isinstance(target, int):
            return target
        off = labels[target] - pc - 1
        if not 0 <= off <= 255:
            raise ValueError(f"BPF jump to {target} out of range ({off})")
        return off

    out = bytearray()
    for pc, (code, jt, jf, k) in enumerate(prog):
        out += struct.pack("<HBBI", code, rel(jt, pc), rel(jf, pc), k)
    if len(prog) > 4096:
        raise ValueError("BPF program too long")
    return bytes(out)


def run_filter(prog: bytes, nr: int, args: tuple[int, ...] = (), arch: int | None = None) -> int:
    """Evaluate `prog` on a seccomp_data in Python: the decision the kernel would take.

    Used by tests to check the generated program instruction by instruction without
    installing it.
    """
    arch = arch if arch is not None else syscalls.audit_arch()
    full = tuple(args) + (0,) * (6 - len(args))
    data = struct.pack("<iIQ6Q", nr, arch, 0, *full)
    insns = [struct.unpack_from("<HBBI", prog, i) for i in range(0, len(prog), 8)]
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        if code == _BPF_LD_W_ABS:
            acc = struct.unpack_from("<I", data, k)[0]
        elif code == _BPF_JEQ_K:
            pc += jt if acc == k else jf
        elif code == _BPF_JGE_K:
            pc += jt if acc >= k else jf
        elif code == _BPF_RET_K:
            return k
        else:
            raise ValueError(f"unexpected BPF opcode {code:#x}")
        pc += 1


_installed = False  # set by `install`: a filter cannot be removed


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]


def install(prog: bytes, *, all_threads: bool = True) -> int:
    """Install `prog` on the calling process; return the notification listener fd.

    Where in start-up: after MPI init. MPI init opens and maps its shared-memory segments,
    reads hwloc's /sys topology and wires up sockets; done before the filter these stay
    native and wire-up is not slowed by a round trip per call. It also starts helper threads
    (Open MPI's progress and PMIx threads), which is why TSYNC is used: a filter only covers
    threads created after it, so without TSYNC I/O from those threads would silently bypass
    the proxy. With NEW_LISTENER the return value is the listener fd, so a TSYNC failure
    could not be told apart from a thread id; TSYNC_ESRCH makes it fail with ESRCH instead.
    WAIT_KILLABLE_RECV: once the proxy has received a call the rank waits killably, as in a
    native regular-file read or write; before that a signal restarts the call untouched.
    PR_SET_NO_NEW_PRIVS is required for an unprivileged filter and also keeps a setuid
    binary exec'd under the filter from gaining privileges the proxy does not have.
    SPEC_ALLOW: this filter is an offload, not a sandbox, so it must not switch on the
    speculative-store-bypass mitigation (kernels booted with spec_store_bypass_disable=
    seccomp would otherwise slow every store of the rank's compute).
    """
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")
    flags = FILTER_FLAG_NEW_LISTENER | FILTER_FLAG_WAIT_KILLABLE_RECV | FILTER_FLAG_SPEC_ALLOW
    if all_threads:
        flags |= FILTER_FLAG_TSYNC | FILTER_FLAG_TSYNC_ESRCH
    fprog = _SockFprog(len(prog) // 8, prog)
    fd = libc.syscall(SYS_SECCOMP, SECCOMP_SET_MODE_FILTER, flags, ctypes.byref(fprog))
    if fd < 0:
        err = linux.errno()
        why = {
            errno.EBUSY: "this process is already under a filter with a listener "
                         "(offload cannot be nested)",
            errno.ESRCH: "a thread of this process has a seccomp filter of its own "
                         "(TSYNC failed)",
            errno.EINVAL: "the kernel does not support seccomp user notification with "
                          "WAIT_KILLABLE_RECV (Linux >= 5.19)",
        }.get(err, os.strerror(err))
        raise OSError(err, f"seccomp filter installation failed: {why}")
    global _installed
    _installed = True
    return int(fd)


def installed() -> bool:
    """Whether this process installed a filter with `install` (it cannot be undone)."""
    return _installed


# --- small wrappers ------------------------------------------------------------------------------


def pidfd_open(pid: int) -> int:
    """A pidfd of process `pid` (liveness by poll, signals, pidfd_getfd)."""
    fd = syscall(SYS_PIDFD_OPEN, pid, 0)
    if fd < 0:
        raise OSError(-fd, os.strerror(-fd))
    return fd


def pidfd_getfd(pidfd: int, targetfd: int) -> int:
    """A duplicate of descriptor `targetfd` of the process behind `pidfd` (same file)."""
    fd = syscall(SYS_PIDFD_GETFD, pidfd, targetfd, 0)
    if fd < 0:
        raise OSError(-fd, os.strerror(-fd))
    return fd


def set_ptracer(pid: int) -> None:
    """Let `pid` (the proxy) read this process's memory under Yama ptrace_scope=1.

    Without Yama the call fails with EINVAL and nothing is needed.
    """
    libc.prctl(PR_SET_PTRACER, pid, 0, 0, 0)


def notif_sizes() -> tuple[int, int, int]:
    """(seccomp_notif, seccomp_notif_resp, seccomp_data) sizes as this kernel defines them."""
    buf = (ctypes.c_uint16 * 3)()
    if libc.syscall(SYS_SECCOMP, SECCOMP_GET_NOTIF_SIZES, 0, ctypes.byref(buf)) != 0:
        err = linux.errno()
        raise OSError(err, os.strerror(err))
    return buf[0], buf[1], buf[2]


# --- feature probe -------------------------------------------------------------------------------

_PROBE_NR = 110  # getppid: a call nothing in the probe child makes on its own
_PROBE_FD = 900


def _probe_child(report_fd: int) -> None:
    """Runs in a forked child: install a listener, trap getppid in a grandchild, ADDFD."""
    signal.alarm(5)
    found: dict[str, Any] = {}
    try:
        found["notif_sizes"] = list(notif_sizes())
        prog = b"".join(struct.pack("<HBBI", *i) for i in (
            (_BPF_LD_W_ABS, 0, 0, _OFF_NR), (_BPF_JEQ_K, 0, 1, _PROBE_NR),
            (_BPF_RET_K, 0, 0, RET_USER_NOTIF), (_BPF_RET_K, 0, 0, RET_ALLOW)))
        libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        fprog = _SockFprog(len(prog) // 8, prog)
        listener = libc.syscall(SYS_SECCOMP, SECCOMP_SET_MODE_FILTER,
                                 FILTER_FLAG_NEW_LISTENER | FILTER_FLAG_WAIT_KILLABLE_RECV,
                                 ctypes.byref(fprog))
        if listener < 0:
            err = linux.errno()
            listener = libc.syscall(SYS_SECCOMP, SECCOMP_SET_MODE_FILTER,
                                     FILTER_FLAG_NEW_LISTENER, ctypes.byref(fprog))
            found["wait_killable_recv"] = False
            if listener < 0:
                found["user_notif"] = False
                found["error"] = f"listener: {os.strerror(linux.errno())}"
                return
            found["error"] = f"WAIT_KILLABLE_RECV: {os.strerror(err)}"
        else:
            found["wait_killable_recv"] = True
        found["user_notif"] = True
        pid = os.fork()
        if pid == 0:
            got = libc.syscall(_PROBE_NR)
            ok = got == _PROBE_FD and fcntl.fcntl(_PROBE_FD, fcntl.F_GETFD) >= 0
            os._exit(0 if ok else 1)
        raw = fcntl.ioctl(listener, IOCTL_NOTIF_RECV, NOTIF_ZERO)
        notif_id = NOTIF.unpack(raw)[0]
        src = os.open("/dev/null", os.O_RDONLY)
        try:
            fcntl.ioctl(listener, IOCTL_NOTIF_ADDFD, NOTIF_ADDFD.pack(
                notif_id, ADDFD_FLAG_SETFD | ADDFD_FLAG_SEND, src, _PROBE_FD, 0))
            found["addfd"] = found["addfd_send"] = True
        except OSError as e:
            found["addfd"] = found["addfd_send"] = False
            found["error"] = f"ADDFD: {os.strerror(e.errno)}"
            fcntl.ioctl(listener, IOCTL_NOTIF_SEND, NOTIF_RESP.pack(notif_id, 0, -errno.ENOSYS, 0))
        status = os.waitpid(pid, 0)[1]
        if found["addfd"] and os.waitstatus_to_exitcode(status) != 0:
            found["addfd"] = False
            found["error"] = "ADDFD did not install the descriptor"
    except OSError as e:
        found.setdefault("user_notif", False)
        found["error"] = f"{e.strerror or e}"
    finally:
        os.write(report_fd, repr(found).encode())
        os._exit(0)


def probe() -> dict[str, Any]:
    """What this kernel offers for offload, found by trying it in a forked child.

    The calling process never gets a filter (a filter cannot be removed), so `mckmpi info`
    and the proxy can probe freely. Keys: kernel, machine, user_notif, wait_killable_recv,
    addfd, addfd_send, notif_sizes, offload_ok, and error when something is missing.
    """
    import ast

    result: dict[str, Any] = {"kernel": platform.release(), "machine": platform.machine(),
                              "user_notif": False, "wait_killable_recv": False,
                              "addfd": False, "addfd_send": False}
    try:
        syscalls.table()
    except FeatureUnavailable as e:
        result["error"] = str(e)
        result["offload_ok"] = False
        return result
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _probe_child(w)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 4096):
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    if chunks:
        result.update(ast.literal_eval(b"".join(chunks).decode()))
    else:
        result["error"] = "probe child died"
    result["offload_ok"] = all(result.get(k) for k in ("user_notif", "wait_killable_recv",
                                                        "addfd"))
    return result


def require() -> None:
    """Raise FeatureUnavailable (one clear line) unless offload can work on this kernel."""
    found = probe()
    if not found["offload_ok"]:
        missing = [k for k in ("user_notif", "wait_killable_recv", "addfd") if not found.get(k)]
        raise FeatureUnavailable(
            f"--offload io needs seccomp user notification with ADDFD and WAIT_KILLABLE_RECV "
            f"(Linux >= 5.19); kernel {found['kernel']} lacks {', '.join(missing)}"
            + (f" ({found['error']})" if found.get("error") else ""))


_SO_PEERGROUPS = 59


def peer_groups(sock: socket.socket) -> list[int] | None:
    """Supplementary groups of the process at the other end of a Unix socket (SO_PEERGROUPS),
    None if it has more than 256 (Python caps the option buffer at 1 KiB)."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 1024)
    except OSError:
        return None
    return list(struct.unpack(f"{len(raw) // 4}I", raw))


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid
