"""Linux x86-64 system-call ABI facts the proxy's call handlers share: call numbers, limits,
the sizes of the structures they copy out, and how a raw argument reads as a C integer."""

from __future__ import annotations

from mckmpi.offload import syscalls

MAX_RW = 0x7FFFF000           # the kernel's MAX_RW_COUNT
TASK_SIZE = 0x7FFFFFFFF000    # x86_64 user address space end (4-level paging)
STAT_SIZE = 144               # struct stat

SYS = {name: row.nr for name, row in syscalls.table().items()}


def i32(x: int) -> int:
    """The low 32 bits of a syscall argument as a C int."""
    x &= 0xFFFFFFFF
    return x - (1 << 32) if x & 0x80000000 else x


def i64(x: int) -> int:
    """A syscall argument as a signed 64-bit value (off_t, loff_t)."""
    return x - (1 << 64) if x >> 63 else x
