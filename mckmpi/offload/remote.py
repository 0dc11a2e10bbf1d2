"""Remote memory: the proxy's ways into a rank's address space.

* `ArenaMapping`: the proxy's shared mapping of a rank's arena memfd. A buffer inside the arena
  is read or written in place (the kernel copies once, as natively).
* `read_memory`: an fd of /proc/<pid>/mem reads the rank's buffers with one `preadv` -- it
  is bound to the address space it was opened on, so a recycled pid can never redirect it.
* `write_memory`: `process_vm_writev`, which honours page protections exactly as the
  kernel's own copy_to_user would (EFAULT for a read-only buffer), where /proc/<pid>/mem
  would force the write.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct

from mckmpi.linux import libc

_MADV_POPULATE_WRITE = 23
_vm_writev = libc.process_vm_writev
_vm_writev.restype = ctypes.c_ssize_t
_vm_writev.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p,
                       ctypes.c_ulong, ctypes.c_ulong]
#: a local and a remote iovec, back to back
IOV2 = struct.Struct("<QQQQ")


class ArenaMapping:
    """The proxy's shared mapping of a rank's arena memfd, and where the rank maps it."""

    def __init__(self, memfd: int, address: int, size: int) -> None:
        self.map = mmap.mmap(memfd, size, flags=mmap.MAP_SHARED,
                             prot=mmap.PROT_READ | mmap.PROT_WRITE)
        try:  # fill the page tables now, not with a fault inside a rank's call
            self.map.madvise(_MADV_POPULATE_WRITE)
        except OSError:
            pass  # before Linux 5.14: pages fault in on first use instead
        self.view = memoryview(self.map)
        self.address = address
        self.end = address + size

    def close(self) -> None:
        """Unmap; a view still held by a thread that did not stop keeps the mapping alive."""
        try:
            self.view.release()
            self.map.close()
        except BufferError:
            pass


def open_memory(tgid: int) -> int:
    """A descriptor of process `tgid`'s memory (/proc/<tgid>/mem, read-only)."""
    return os.open(f"/proc/{tgid}/mem", os.O_RDONLY | os.O_CLOEXEC)


def read_memory(memfd: int, addr: int, into: memoryview) -> int:
    """Copy remote memory at `addr` into `into`; bytes copied (0 where nothing is mapped)."""
    try:
        return os.preadv(memfd, [into], addr)
    except OSError:
        return 0


def write_memory(tgid: int, iov: ctypes.Array, iov_addr: int, local_addr: int, addr: int,
                 n: int) -> int:
    """Copy `n` bytes at proxy address `local_addr` to `addr` in process `tgid`; bytes
    copied. `iov` (at `iov_addr`): the caller's scratch buffer of IOV2.size bytes, reused
    so the hot path allocates nothing."""
    IOV2.pack_into(iov, 0, local_addr, n, addr, n)
    return max(_vm_writev(tgid, iov_addr, 1, iov_addr + 16, 1, 0), 0)
