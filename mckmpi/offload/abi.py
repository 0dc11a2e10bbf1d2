"""Shared vocabulary of the proxy's call handlers: constants and signedness."""

from __future__ import annotations

import os
import struct

from mckmpi.offload import syscalls

#: a handler result that is not a syscall result: let the kernel run the call in the rank
CONTINUE = -(1 << 40)

MAX_RW = 0x7FFFF000           # the kernel's MAX_RW_COUNT
UIO_MAXIOV = 1024
TASK_SIZE = 0x7FFFFFFFF000    # x86_64 user address space end (4-level paging)
BOUNCE = 4 << 20              # the proxy's copy buffer for non-arena data, per rank
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_REMOVEDIR = 0x200
AT_SYMLINK_NOFOLLOW = 0x100
O_TMPFILE = 0o20200000
CLOSE_RANGE_CLOEXEC = 4
STAT_SIZE = 144
STATX_SIZE = 256
#: the open flags F_SETFL can restore after the proxy opened with O_NONBLOCK
SETFL_KEEP = os.O_APPEND | os.O_DIRECT | os.O_NOATIME
PROC_DEV = os.stat("/proc").st_dev
Q = struct.Struct("<Q")
q = struct.Struct("<q")

SYS = {name: row.nr for name, row in syscalls.table().items()}


def i32(x: int) -> int:
    """The low 32 bits of a syscall argument as a C int."""
    x &= 0xFFFFFFFF
    return x - (1 << 32) if x & 0x80000000 else x


def i64(x: int) -> int:
    """A syscall argument as a signed 64-bit value (off_t, loff_t)."""
    return x - (1 << 64) if x >> 63 else x

