"""The one boundary to libc and raw system calls: one CDLL, one errno helper.

Everything in mckmpi that calls into the C library (seccomp, process_vm_*, mbind, mlock,
prctl, ...) goes through `libc` here, so argument types are declared once and every failure
becomes an `OSError` with the call's name the same way.
"""

from __future__ import annotations

import ctypes
import os

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                       ctypes.c_ulong)
libc.mlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)


def errno() -> int:
    """errno of the last failed libc call made through `libc` on this thread."""
    return ctypes.get_errno()


def os_error(what: str, err: int | None = None) -> OSError:
    """An OSError for a failed call named `what` (errno of the last call unless given)."""
    err = ctypes.get_errno() if err is None else err
    return OSError(err, f"{what}: {os.strerror(err)}")


def check(result: int, what: str) -> int:
    """`result` of a libc call, or the OSError of its errno when it is negative."""
    if result < 0:
        raise os_error(what)
    return result


def syscall(nr: int, *args: int | bytes | None) -> int:
    """A raw system call: its result, or -errno (no exception: callers forward errnos)."""
    r = libc.syscall(ctypes.c_long(nr), *(ctypes.c_char_p(a) if isinstance(a, bytes)
                                          else ctypes.c_long(a or 0) for a in args))
    return r if r >= 0 else -ctypes.get_errno()


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    """prctl(2), raising OSError on failure."""
    return check(libc.prctl(option, arg2, arg3, arg4, arg5), f"prctl({option})")


AT_FDCWD = -100
RENAME_NOREPLACE = 1
libc.renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                           ctypes.c_uint)


def rename_noreplace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """rename(2) that fails with EEXIST instead of replacing `dst` (renameat2 NOREPLACE):
    a finished file never overwrites another."""
    check(libc.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst),
                         RENAME_NOREPLACE), f"rename {os.fspath(src)} -> {os.fspath(dst)}")


#: perf_event_open(2) numbers by machine.
_NR_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241, "ppc64le": 319, "s390x": 331, "riscv64": 241}


def perf_event_open(attr: bytes, pid: int, cpu: int, group_fd: int = -1, flags: int = 0) -> int:
    """perf_event_open(2): a counter's descriptor, raising OSError (unknown machine: ENOSYS)."""
    import platform

    nr = _NR_PERF_EVENT_OPEN.get(platform.machine())
    if nr is None:
        raise OSError(38, f"perf_event_open: no system call number for {platform.machine()}")
    result = syscall(nr, attr, pid, cpu, group_fd, flags)
    if result < 0:
        raise os_error("perf_event_open", -result)
    return result
