"""The proxy's view of one process under a rank's filter: its memory and its descriptors.

The filter covers the rank and everything it forks, so the proxy keys state by process
(thread-group id): a forked child has its own descriptor table and address space. The
proxy keeps, per process,

* a pidfd (liveness, and `pidfd_getfd` to fetch a descriptor the proxy did not install:
  inherited by a child, or a dirfd the rank opened natively),
* an fd of /proc/<pid>/mem to read the rank's buffers with one `preadv` -- bound to the
  address space it was opened on, so a recycled pid can never redirect it,
* the cache of offloaded descriptors: rank fd number -> (proxy's duplicate, emulate?).
  The duplicate shares the rank's open file description, so offsets and flags are one.

Writes into the rank's memory use `process_vm_writev`, which honours page protections
exactly as the kernel's own copy_to_user would (EFAULT for a read-only buffer), where
/proc/<pid>/mem would force the write.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import stat
import struct

from mckmpi.linux import libc
from mckmpi.offload.seccomp import pidfd_getfd, pidfd_open

_vm_writev = libc.process_vm_writev
_vm_writev.restype = ctypes.c_ssize_t
_vm_writev.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p,
                       ctypes.c_ulong, ctypes.c_ulong]
_IOV2 = struct.Struct("<QQQQ")

#: An entry of a process's descriptor cache: (proxy's duplicate, emulate it?)
Entry = tuple[int, bool]


class Gone(Exception):
    """The process went away while the proxy was looking at it."""


class Proc:
    """State of one process (thread group) under a rank's filter."""

    __slots__ = ("_iov", "_iov_addr", "base", "fds", "low", "mem", "pidfd", "tgid", "umask")

    def __init__(self, tgid: int, umask: int, fd_base: int) -> None:
        self.tgid = tgid
        self.pidfd = pidfd_open(tgid)
        try:
            self.mem = os.open(f"/proc/{tgid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            os.close(self.pidfd)
            raise
        self.fds: dict[int, Entry] = {}
        self.umask = umask
        self.base = fd_base
        self.low = fd_base
        self._iov = ctypes.create_string_buffer(_IOV2.size)
        self._iov_addr = ctypes.addressof(self._iov)

    def alive(self) -> bool:
        return not select.select([self.pidfd], [], [], 0)[0]

    def reopen_mem(self) -> None:
        """After an execve the old /proc/<pid>/mem reads nothing: open the new image's."""
        fd = os.open(f"/proc/{self.tgid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        os.close(self.mem)
        self.mem = fd

    def read(self, addr: int, into: memoryview) -> int:
        """Copy rank memory at `addr` into `into`; bytes copied (short at an unmapped page)."""
        try:
            n = os.preadv(self.mem, [into], addr)
        except OSError:
            n = 0
        if n == 0 and len(into):  # nothing at all: maybe the process exec'd a new image
            try:
                self.reopen_mem()
                n = os.preadv(self.mem, [into], addr)
            except OSError:
                n = 0
        return n

    def write(self, addr: int, local_addr: int, n: int) -> int:
        """Copy `n` bytes at proxy address `local_addr` to rank address `addr`."""
        if n == 0:
            return 0
        _IOV2.pack_into(self._iov, 0, local_addr, n, addr, n)
        got = _vm_writev(self.tgid, self._iov_addr, 1, self._iov_addr + 16, 1, 0)
        return max(got, 0)

    def fetch(self, fd: int) -> Entry | None:
        """A duplicate of the process's descriptor `fd`, or None if it is not open."""
        try:
            dup = pidfd_getfd(self.pidfd, fd)
        except OSError as e:
            if e.errno in (errno.EBADF, errno.ESRCH):
                return None
            raise
        mode = os.fstat(dup).st_mode
        return dup, stat.S_ISREG(mode) or stat.S_ISDIR(mode)

    def forget(self, fd: int) -> None:
        entry = self.fds.pop(fd, None)
        if entry is not None:
            os.close(entry[0])
            self.low = min(self.low, fd)

    def forget_all(self) -> None:
        for dup, _ in self.fds.values():
            os.close(dup)
        self.fds.clear()
        self.low = self.base

    def free_slot(self, minimum: int) -> int:
        """Lowest number >= minimum free in the process (cache first, then the kernel).

        `low` is a hint: every number below it is known to be taken, so a search that
        starts there may move it up.
        """
        from_low = minimum <= self.low
        n = self.low if from_low else minimum
        while True:
            if n not in self.fds:
                if not os.path.lexists(f"/proc/{self.tgid}/fd/{n}"):
                    if from_low:
                        self.low = n + 1
                    return n
                entry = self.fetch(n)  # a descriptor the rank made natively in the range
                if entry is not None:
                    self.fds[n] = entry
            n += 1

    def close(self) -> None:
        self.forget_all()
        os.close(self.mem)
        os.close(self.pidfd)


def task_facts(tid: int) -> tuple[int, int]:
    """(thread-group id, umask) of task `tid`, from /proc/<tid>/status."""
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            text = f.read()
    except OSError as e:
        raise Gone(f"task {tid}: {e.strerror}") from None
    tgid = umask = None
    for line in text.splitlines():
        if line.startswith(b"Tgid:"):
            tgid = int(line.split()[1])
        elif line.startswith(b"Umask:"):
            umask = int(line.split()[1], 8)
    if tgid is None or umask is None:
        raise Gone(f"task {tid}: no Tgid/Umask in status")
    return tgid, umask
