"""The LWK arena: one pre-faulted, shareable memory region per rank and its allocator.

McKernel's lightweight kernel owns its memory: it is taken from Linux once at boot, backed by
large pages, never paged out, and handed to the application by an allocator whose cost does
not depend on the history of the heap. An `Arena` does the same inside a rank:

* a memfd of `size` bytes mapped MAP_SHARED, so the offload proxy can map the very same pages
  (zero-copy I/O) -- the descriptor stays open as `Arena.memfd`;
* pre-faulted at boot (MADV_POPULATE_WRITE, else one write per page), so the first write to an
  array never takes a page fault and the kernel never zeroes a page in the application's
  time;
* locked (mlock) when permitted, huge pages when the node has them (MFD_HUGETLB from the
  reserved pool, else MADV_HUGEPAGE for shmem THP), bound to a NUMA node on request;
* every boot decision is recorded with its reason in `Arena.stats()`, so a run file says what
  the rank really got, never what it asked for.

Allocator choice: TLSF (two-level segregated fit), not a buddy system. Both have bounded
time, but TLSF does alloc and free in O(1) with a fixed number of steps (one bitmap search,
at most one split, at most two merges) while a buddy allocator loops over up to log2(size)
orders to split and to coalesce; and a buddy rounds every request up to a power of two
(up to 50 % internal waste), whereas TLSF splits exactly (64-byte granularity) and bounds the
search waste by its 32 second-level classes per power of two. The hot path is plain Python
list indexing and integer arithmetic on tables preallocated at boot. It creates no container
(so the cyclic GC cannot start in the middle of an operation), only ints; once the
interpreter's heap holds their working set, an operation neither faults nor enters the
kernel (`mckmpi bench memory` measures both).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import math
import mmap
import operator
import os
import platform
import resource
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np

from mckmpi.errors import FeatureUnavailable, UsageError

ALIGNMENT = 64
"""Every arena array starts on a 64-byte boundary (one cache line, AVX-512 vectors)."""

_SHIFT = 6  # log2(ALIGNMENT): the allocator counts in 64-byte units
_SLI = 5  # log2 of the number of second-level classes per power of two
_USED = -1  # descriptor class marker: block handed out
_SPARE = -2  # descriptor class marker: descriptor not describing any block
_FREED = -2  # _Block.handle after an explicit free (a fallback array's handle is -1)

_POLICIES = {
    "hugepages": ("auto", "never", "require"),
    "lock": ("auto", "never", "require"),
    "fallback": ("error", "linux"),
}
_MADV_POPULATE_WRITE = 23  # Linux 5.14
_MPOL_BIND = 2
_MPOL_MF_STRICT = 1
_MPOL_MF_MOVE = 2
_NR_MBIND = {"x86_64": 237, "aarch64": 235, "riscv64": 235, "ppc64le": 259, "s390x": 268}
_THP = "/sys/kernel/mm/transparent_hugepage"


def _class_of(units: int) -> int:
    """Free-list class holding blocks of `units` (rounded down): exact below 64 units."""
    s = units.bit_length() - _SLI - 1
    return (s << _SLI) + (units >> s) if s > 0 else units


class Allocator:
    """TLSF bookkeeping over the byte range [0, size) in 64-byte units.

    Blocks are described by slots in parallel lists (offset, length, physical neighbours,
    free-list links, class); a handle is a slot index. Free blocks sit in doubly linked lists,
    one per (first level, second level) class, and one integer bitmap says which lists are
    non-empty, so finding a fitting block is one shift and one lowest-set-bit. The slot
    tables are preallocated for `capacity` blocks and double when a heap needs more (live
    blocks + free blocks, at most twice the live blocks plus one): that amortised growth is
    the only step of unbounded cost, and it never happens below the boot-time capacity.
    """

    __slots__ = ("size", "allocations", "frees", "free_blocks", "_used", "_peak", "_heads",
                 "_bitmap", "_off", "_len", "_prev", "_next", "_fnext", "_fprev", "_cls",
                 "_spare")

    def __init__(self, size: int, capacity: int = 4096) -> None:
        units = size >> _SHIFT
        if units < 1:
            raise ValueError(f"allocator size must be at least {ALIGNMENT} bytes, got {size}")
        self.size = units << _SHIFT
        self.allocations = self.frees = 0
        self._used = self._peak = 0
        self._heads = [-1] * (_class_of(units) + 1)
        self._bitmap = 0
        cap = max(2, capacity)
        self._off = [0] * cap
        self._len = [0] * cap
        self._prev = [-1] * cap
        self._next = [-1] * cap
        self._fnext = list(range(1, cap + 1))  # spare slots are chained through _fnext
        self._fnext[-1] = -1
        self._fprev = [-1] * cap
        self._cls = [_SPARE] * cap
        self._spare = 1
        self._len[0] = units
        c = _class_of(units)
        self._heads[c] = 0
        self._fnext[0] = -1
        self._cls[0] = c
        self._bitmap = 1 << c
        self.free_blocks = 1

    @property
    def in_use(self) -> int:
        """Bytes in live blocks (requests rounded up to 64 bytes)."""
        return self._used << _SHIFT

    @property
    def peak(self) -> int:
        """Highest `in_use` seen."""
        return self._peak << _SHIFT

    @property
    def live(self) -> int:
        """Number of blocks handed out and not freed."""
        return self.allocations - self.frees

    def offset(self, handle: int) -> int:
        """Byte offset of a live block."""
        return self._off[handle] << _SHIFT

    def block_size(self, handle: int) -> int:
        """Size in bytes of a live block (its request rounded up to 64 bytes)."""
        return self._len[handle] << _SHIFT

    def alloc(self, nbytes: int) -> int:
        """Hand out a block of at least `nbytes`; its handle, or -1 when nothing fits."""
        u = (nbytes + 63) >> 6 or 1
        s = u.bit_length() - 6
        # Round the request up to the next class boundary: every block there fits.
        idx = (s << 5) + ((u + (1 << s) - 1) >> s) if s > 0 else u
        m = self._bitmap >> idx
        if not m:
            return -1
        idx += (m & -m).bit_length() - 1
        heads = self._heads
        fnext = self._fnext
        h = heads[idx]
        x = fnext[h]
        heads[idx] = x
        if x < 0:
            self._bitmap ^= 1 << idx
        else:
            self._fprev[x] = -1
        cls = self._cls
        cls[h] = _USED
        length = self._len
        rem = length[h] - u
        if rem:
            d = self._spare
            if d < 0:
                d = self._grow()
            self._spare = fnext[d]
            length[h] = u
            length[d] = rem
            off = self._off
            off[d] = off[h] + u
            nxt = self._next
            x = nxt[h]
            nxt[d] = x
            if x >= 0:
                self._prev[x] = d
            nxt[h] = d
            self._prev[d] = h
            s = rem.bit_length() - 6
            c = (s << 5) + (rem >> s) if s > 0 else rem
            x = heads[c]
            fnext[d] = x
            fprev = self._fprev
            fprev[d] = -1
            if x < 0:
                self._bitmap |= 1 << c
            else:
                fprev[x] = d
            heads[c] = d
            cls[d] = c
        else:
            self.free_blocks -= 1
        used = self._used + u
        self._used = used
        if used > self._peak:
            self._peak = used
        self.allocations += 1
        return h

    def free(self, handle: int) -> None:
        """Return a live block, merging it with free physical neighbours."""
        h = handle
        cls = self._cls
        if h < 0 or cls[h] != _USED:
            raise ValueError(f"allocator handle {handle} is not a live block")
        length = self._len
        nxt = self._next
        prv = self._prev
        fnext = self._fnext
        fprev = self._fprev
        u = length[h]
        self._used -= u
        self.frees += 1
        p = prv[h]
        if p >= 0:
            c = cls[p]
            if c >= 0:
                a = fprev[p]
                b = fnext[p]
                if a >= 0:
                    fnext[a] = b
                else:
                    self._heads[c] = b
                    if b < 0:
                        self._bitmap ^= 1 << c
                if b >= 0:
                    fprev[b] = a
                u += length[p]
                x = nxt[h]
                nxt[p] = x
                if x >= 0:
                    prv[x] = p
                cls[h] = _SPARE
                fnext[h] = self._spare
                self._spare = h
                h = p
                self.free_blocks -= 1
        n = nxt[h]
        if n >= 0:
            c = cls[n]
            if c >= 0:
                a = fprev[n]
                b = fnext[n]
                if a >= 0:
                    fnext[a] = b
                else:
                    self._heads[c] = b
                    if b < 0:
                        self._bitmap ^= 1 << c
                if b >= 0:
                    fprev[b] = a
                u += length[n]
                x = nxt[n]
                nxt[h] = x
                if x >= 0:
                    prv[x] = h
                cls[n] = _SPARE
                fnext[n] = self._spare
                self._spare = n
                self.free_blocks -= 1
        length[h] = u
        s = u.bit_length() - 6
        c = (s << 5) + (u >> s) if s > 0 else u
        heads = self._heads
        x = heads[c]
        fnext[h] = x
        fprev[h] = -1
        if x < 0:
            self._bitmap |= 1 << c
        else:
            fprev[x] = h
        heads[c] = h
        cls[h] = c
        self.free_blocks += 1

    def _grow(self) -> int:
        """Double the slot tables; return the first new slot (the rest become spares)."""
        cap = len(self._off)
        self._off += [0] * cap
        self._len += [0] * cap
        self._prev += [-1] * cap
        self._next += [-1] * cap
        self._fnext += range(cap + 1, 2 * cap + 1)
        self._fnext[-1] = -1
        self._fprev += [-1] * cap
        self._cls += [_SPARE] * cap
        return cap

    def largest_free(self) -> int:
        """Bytes in the largest free block (scans one free list: not for the hot path)."""
        if not self._bitmap:
            return 0
        h = self._heads[self._bitmap.bit_length() - 1]
        best = 0
        while h >= 0:
            best = max(best, self._len[h])
            h = self._fnext[h]
        return best << _SHIFT

    def blocks(self) -> Iterator[tuple[int, int, bool]]:
        """Every block in address order as (offset, size, is_free)."""
        h = 0  # slot 0 always describes the block at offset 0: merges keep the lower slot
        while h >= 0:
            yield self._off[h] << _SHIFT, self._len[h] << _SHIFT, self._cls[h] >= 0
            h = self._next[h]

    def stats(self) -> dict[str, int | float]:
        """Counters and fragmentation (1 - largest free / total free; 0 when nothing free)."""
        total_free = self.size - self.in_use
        largest = self.largest_free()
        return {
            "in_use": self.in_use,
            "peak": self.peak,
            "allocations": self.allocations,
            "frees": self.frees,
            "live": self.live,
            "free_blocks": self.free_blocks,
            "largest_free": largest,
            "fragmentation": 1.0 - largest / total_free if total_free else 0.0,
        }


class ArenaExhausted(MemoryError, UsageError):
    """The arena cannot serve a request and the policy forbids falling back to Linux."""


class _Block:
    """Owner of one arena block, seen by numpy through `__array_interface__`.

    The ndarray built from it keeps it as `.base` and every view keeps that ndarray, so the
    block returns to the arena exactly when the last array using it dies.
    """

    __slots__ = ("arena", "handle", "keep", "__array_interface__")

    def __init__(self, arena: Arena, handle: int, interface: dict[str, Any],
                 keep: np.ndarray | None = None) -> None:
        self.arena = arena
        self.handle = handle
        self.keep = keep
        self.__array_interface__ = interface

    def __del__(self) -> None:
        if self.handle >= 0:
            self.arena._release(self.handle)


_DTYPES: dict[Any, tuple[str, int, list[tuple[Any, ...]] | None]] = {}
"""dtype argument -> (typestr, itemsize, descr for structured dtypes): keeps np.dtype() and
dtype.str off the allocation path after the first array of each dtype."""


def _dtype_spec(dtype: Any, shape: Any) -> tuple[str, int, Any, Any]:
    """Interface fields of `dtype`; a subarray dtype moves its dimensions into `shape`."""
    dt = np.dtype(dtype)
    if dt.hasobject:
        raise TypeError("arena arrays cannot hold Python objects")
    if dt.subdtype is not None:
        dt, sub = dt.subdtype
        try:
            shape = (operator.index(shape), *sub)
        except TypeError:
            shape = (*shape, *sub)
        return dt.str, dt.itemsize, None, shape
    spec = (dt.str, dt.itemsize, dt.descr if dt.names is not None else None)
    with contextlib.suppress(TypeError):  # an unhashable dtype description: not cached
        _DTYPES[dtype] = spec
    return (*spec, shape)


def _owner(array: Any) -> _Block | None:
    """The arena block behind an array or any of its views, if any."""
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    return base if isinstance(base, _Block) else None


def _meminfo() -> dict[str, int]:
    """/proc/meminfo as a dict; sizes in bytes, counts (HugePages_*) as they are."""
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            info[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return info


def _cgroup_headroom() -> int | None:
    """Bytes left under the tightest memory cgroup limit on this process's path (v1 or v2).

    Under Slurm the job's cgroup, not the node's MemAvailable, decides when pre-faulting the
    arena would invoke the OOM killer.
    """
    try:
        with open("/proc/self/cgroup") as f:
            entries = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        return None
    best = None
    for _, controllers, path in entries:
        if controllers == "":
            root, files = "/sys/fs/cgroup", ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):
            root = "/sys/fs/cgroup/memory"
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):
            directory = os.path.join(root, *parts[:depth])
            try:
                with open(os.path.join(directory, files[0])) as f:
                    limit = f.read().strip()
                with open(os.path.join(directory, files[1])) as f:
                    usage = int(f.read())
            except OSError:
                continue
            if limit.isdigit():
                left = int(limit) - usage
                best = left if best is None else min(best, left)
    return best


def _available_memory(info: dict[str, int]) -> tuple[int, str]:
    """Bytes of ordinary memory an arena may take, and which limit that is."""
    headroom = _cgroup_headroom()
    if headroom is not None and headroom < info["MemAvailable"]:
        return max(headroom, 0), "left under the memory cgroup limit"
    return info["MemAvailable"], "MemAvailable"


def _human(nbytes: int) -> str:
    """A byte count for messages: '64 B', '1.5 MiB'."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.4g} {unit}"
    return f"{nbytes} B"


def _read_setting(path: str) -> str:
    """The selected value of a sysfs choice file ('always [madvise] never' -> 'madvise')."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return "unavailable"
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if start >= 0 < end else text.strip()


def _shmem_thp() -> tuple[bool, str]:
    """Whether MADV_HUGEPAGE can give this shmem mapping 2 MiB pages, and the setting read."""
    top = _read_setting(f"{_THP}/shmem_enabled")
    per_size = _read_setting(f"{_THP}/hugepages-2048kB/shmem_enabled")
    effective = top if per_size in ("inherit", "unavailable") else per_size
    setting = f"shmem_enabled={top}" + ("" if effective == top else f", 2048kB={per_size}")
    return effective in ("always", "within_size", "advise", "force"), setting


def _smaps(address: int) -> dict[str, int]:
    """The /proc/self/smaps counters (kB) of the mapping starting at `address`."""
    fields: dict[str, int] = {}
    head = f"{address:x}-"
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            if "-" in line.split(" ", 1)[0]:
                if inside:
                    break
                inside = line.startswith(head)
            elif inside:
                key, _, rest = line.partition(":")
                value = rest.split()
                if value and value[0].isdigit():
                    fields[key] = int(value[0])
    return fields


def online_nodes() -> list[int]:
    """NUMA nodes with memory, from sysfs ('0-1,3' -> [0, 1, 3]); [0] without NUMA."""
    try:
        with open("/sys/devices/system/node/has_memory") as f:
            text = f.read().strip()
    except OSError:
        return [0]
    nodes: list[int] = []
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        nodes.extend(range(int(lo), int(hi or lo) + 1))
    return nodes or [0]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)


def bind_memory(address: int, length: int, node: int) -> None:
    """mbind(MPOL_BIND) a page-aligned range to one NUMA node (glibc has no wrapper)."""
    nr = _NR_MBIND.get(platform.machine())
    if nr is None:
        raise FeatureUnavailable(f"NUMA binding: mbind number unknown on {platform.machine()}")
    words = node // 64 + 1
    mask = (ctypes.c_ulong * words)()
    mask[node // 64] = 1 << (node % 64)
    rc = _libc.syscall(ctypes.c_long(nr), ctypes.c_void_p(address), ctypes.c_ulong(length),
                       ctypes.c_long(_MPOL_BIND), mask, ctypes.c_ulong(words * 64 + 1),
                       ctypes.c_uint(_MPOL_MF_STRICT | _MPOL_MF_MOVE))
    if rc != 0:
        err = ctypes.get_errno()
        raise FeatureUnavailable(f"cannot bind arena memory to NUMA node {node}: mbind: "
                                 f"{os.strerror(err)}")


def _raise_memlock() -> str:
    """Raise RLIMIT_MEMLOCK as far as permitted (unlimited for root); say what changed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    inf = resource.RLIM_INFINITY
    if soft == inf:
        return "RLIMIT_MEMLOCK unlimited"
    try:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (inf, inf))
    except (OSError, ValueError):
        if hard == soft:
            return f"RLIMIT_MEMLOCK {_human(soft)}, the hard limit"
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (hard, hard))
        return f"RLIMIT_MEMLOCK raised from {_human(soft)} to " + (
            "unlimited" if hard == inf else _human(hard))
    return f"RLIMIT_MEMLOCK raised from {_human(soft)} to unlimited"


def _check_policy(name: str, value: str) -> None:
    if value not in _POLICIES[name]:
        raise UsageError(f"arena {name} policy must be one of {', '.join(_POLICIES[name])}, "
                         f"got {value!r}")


class Arena:
    """One rank's LWK memory: a pre-faulted shared memfd mapping and a TLSF allocator.

    Arrays from `empty`/`zeros`/`full`/`*_like`/`asarray` are ordinary numpy arrays whose
    memory returns to the arena when the array and all its views die, or at `free`. Using an
    array after `free` is the caller's error: its block may already back another array.
    An arena is thread-safe; alloc and free take one uncontended lock. `capacity` is the
    number of blocks (live + free) the allocator's tables hold before they must grow.
    """

    def __init__(self, size: int, *, hugepages: str = "auto", lock: str = "auto",
                 numa_node: int | None = None, fallback: str = "error",
                 name: str = "mckmpi-arena", capacity: int = 65536) -> None:
        for policy, value in (("hugepages", hugepages), ("lock", lock), ("fallback", fallback)):
            _check_policy(policy, value)
        if isinstance(size, bool) or not isinstance(size, int):
            raise UsageError(f"arena size must be a number of bytes, got {size!r}")
        if size <= 0:
            raise UsageError(f"arena size must be positive, got {size}")
        info = _meminfo()
        huge_free = info.get("HugePages_Free", 0) * info.get("Hugepagesize", 0)
        if size > huge_free or hugepages == "never":
            self._check_fits(size)
        self.fallback = fallback
        self._lock = threading.Lock()
        self._closed = False
        self._fallbacks = 0
        self._fallback_bytes = 0
        self.memfd = -1
        self.address = 0
        self.size = 0
        self._mm: mmap.mmap | None = None
        try:
            self._boot(size, hugepages, lock, numa_node, name, info)
        except BaseException:
            self._unmap()
            raise
        self._allocator = Allocator(self.size, capacity)

    # --- boot ------------------------------------------------------------------------------

    def _boot(self, size: int, hugepages: str, lock: str, numa_node: int | None, name: str,
              info: dict[str, int]) -> None:
        """Create, map, bind, pre-fault and lock the memory; record every outcome."""
        huge = info.get("Hugepagesize", 0)
        pool = info.get("HugePages_Free", 0)
        thp_possible, thp_setting = _shmem_thp()
        self.hugepages = "none"
        why_not_hugetlb = ""
        if hugepages == "never":
            self.hugepage_reason = "disabled by policy"
        else:
            rounded = -(-size // huge) * huge if huge else 0
            need = rounded // huge if huge else 0
            if huge and pool >= need:
                try:
                    self._map(name, rounded, os.MFD_HUGETLB)
                except OSError as e:
                    self._unmap()
                    why_not_hugetlb = f"MFD_HUGETLB failed ({os.strerror(e.errno)})"
                else:
                    self.hugepages = "hugetlb"
                    self.hugepage_reason = (f"MFD_HUGETLB: {need} pages of {huge // 1024} kB "
                                            f"({pool} were free)")
            else:
                why_not_hugetlb = f"no hugetlb pages reserved (HugePages_Free={pool}, need {need})"
            if self.hugepages == "none" and hugepages == "require" and not thp_possible:
                raise FeatureUnavailable(f"huge pages required but unavailable: {why_not_hugetlb};"
                                         f" shmem THP disabled ({thp_setting})")
        if self._mm is None:
            self._check_fits(size)
            self._map(name, -(-size // mmap.PAGESIZE) * mmap.PAGESIZE, 0)
            if hugepages != "never":
                try:
                    self._mm.madvise(mmap.MADV_HUGEPAGE)
                except OSError as e:  # a kernel built without THP
                    thp_setting = f"MADV_HUGEPAGE: {os.strerror(e.errno)}"
        self._bind(numa_node)
        self._prefault()
        if self.hugepages == "none" and hugepages != "never":
            pmd = _smaps(self.address).get("ShmemPmdMapped", 0) << 10
            if pmd:
                self.hugepages = "thp"
                self.hugepage_reason = (f"MADV_HUGEPAGE: {_human(pmd)} of {_human(self.size)} "
                                        f"in 2 MiB pages ({thp_setting}; {why_not_hugetlb})")
            else:
                self.hugepage_reason = f"{why_not_hugetlb}; no shmem THP ({thp_setting})"
                if hugepages == "require":
                    raise FeatureUnavailable(f"huge pages required but unavailable: "
                                             f"{self.hugepage_reason}")
        self._lock_memory(lock)

    @staticmethod
    def _check_fits(size: int) -> None:
        """Refuse a size that ordinary pages cannot back: pre-faulting it would OOM the node."""
        available, source = _available_memory(_meminfo())
        if size > available:
            raise UsageError(f"arena size {_human(size)} exceeds available memory "
                             f"({_human(available)} {source})")

    def _map(self, name: str, size: int, extra_flags: int) -> None:
        """memfd of `size` bytes, sealed against resizing, mapped shared read-write."""
        self.memfd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING | extra_flags)
        self._fd_finalizer = weakref.finalize(self, os.close, self.memfd)
        os.ftruncate(self.memfd, size)
        fcntl.fcntl(self.memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        self._mm = mmap.mmap(self.memfd, size, flags=mmap.MAP_SHARED,
                             prot=mmap.PROT_READ | mmap.PROT_WRITE)
        exported = ctypes.c_char.from_buffer(self._mm)
        self.address = ctypes.addressof(exported)
        del exported  # no lasting buffer export: close() must be able to unmap
        self.size = size

    def _unmap(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None
        if self.memfd >= 0:
            self._fd_finalizer()
            self.memfd = -1

    def _bind(self, node: int | None) -> None:
        nodes = online_nodes()
        if node is None:
            self.numa_node, self.numa_reason = -1, "not requested"
        elif node not in nodes:
            raise UsageError(f"NUMA node {node} does not exist (nodes with memory: "
                             f"{','.join(map(str, nodes))})")
        elif len(nodes) == 1:
            self.numa_node, self.numa_reason = node, "single node"
        else:
            bind_memory(self.address, self.size, node)
            self.numa_node, self.numa_reason = node, "mbind MPOL_BIND"

    def _prefault(self) -> None:
        assert self._mm is not None
        start = time.perf_counter_ns()
        try:
            self._mm.madvise(_MADV_POPULATE_WRITE)
            self.prefault_method = "MADV_POPULATE_WRITE"
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise UsageError(f"cannot populate the {_human(self.size)} arena: "
                                 f"{os.strerror(e.errno)}") from None
            pages = np.frombuffer((ctypes.c_ubyte * self.size).from_address(self.address),
                                  np.uint8)
            pages[::mmap.PAGESIZE] = 0
            self.prefault_method = "touch"
        self.prefault_ns = time.perf_counter_ns() - start

    def _lock_memory(self, policy: str) -> None:
        self.locked = False
        if policy == "never":
            self.lock_reason = "disabled by policy"
            return
        limit = _raise_memlock()
        if _libc.mlock(self.address, self.size) == 0:
            self.locked = True
            self.lock_reason = f"mlock; {limit}"
            return
        self.lock_reason = f"mlock failed: {os.strerror(ctypes.get_errno())}; {limit}"
        if policy == "require":
            raise FeatureUnavailable(f"arena locking required but {self.lock_reason}")

    # --- addresses -------------------------------------------------------------------------

    def contains(self, address: int, length: int = 1) -> bool:
        """Whether [address, address + length) lies inside the arena."""
        return self.address <= address and address + length <= self.address + self.size

    def offset_of(self, address: int) -> int:
        """Offset of `address` in the memfd (what another mapping of it must add)."""
        if not self.contains(address, 0):
            raise ValueError(f"address {address:#x} is outside the arena")
        return address - self.address

    # --- arrays ----------------------------------------------------------------------------

    def empty(self, shape: int | tuple[int, ...], dtype: Any = float,
              order: str = "C") -> np.ndarray:
        """Uninitialised array in arena memory (like numpy.empty)."""
        try:
            typestr, item, descr = _DTYPES[dtype]
        except (KeyError, TypeError):  # first use of this dtype, or a subarray dtype
            typestr, item, descr, shape = _dtype_spec(dtype, shape)
        if type(shape) is int and shape >= 0:
            dims: tuple[int, ...] = (shape,)
            nbytes = shape * item
        else:
            try:
                dims = (operator.index(shape),)
            except TypeError:
                dims = tuple(map(operator.index, shape))
            if min(dims, default=0) < 0:
                raise ValueError("negative dimensions are not allowed")
            nbytes = math.prod(dims) * item
        strides = None
        if order != "C":
            if order != "F":
                raise ValueError(f"order must be 'C' or 'F', got {order!r}")
            if len(dims) > 1:
                strides = tuple(item * math.prod(dims[:i]) for i in range(len(dims)))
        lock = self._lock
        lock.acquire()
        try:
            if self._closed:
                raise ValueError("arena is closed")
            h = self._allocator.alloc(nbytes)
        finally:
            lock.release()
        keep = None
        if h >= 0:
            address = self.address + self._allocator.offset(h)
        else:  # the block stays -1: memory from Linux, nothing to give back to the arena
            keep, address = self._exhausted(nbytes)
        interface = {"shape": dims, "typestr": typestr, "data": (address, False),
                     "strides": strides, "version": 3}
        if descr is not None:
            interface["descr"] = descr
        return np.asarray(_Block(self, h, interface, keep))

    def zeros(self, shape: int | tuple[int, ...], dtype: Any = float,
              order: str = "C") -> np.ndarray:
        """Zero-filled arena array (blocks are reused, so zeroing is explicit)."""
        array = self.empty(shape, dtype, order)
        array.fill(0)
        return array

    def full(self, shape: int | tuple[int, ...], fill_value: Any, dtype: Any = None,
             order: str = "C") -> np.ndarray:
        """Arena array filled with `fill_value` (dtype inferred from it, as numpy does)."""
        if dtype is None:
            dtype = np.asarray(fill_value).dtype
        array = self.empty(shape, dtype, order)
        array[...] = fill_value
        return array

    def empty_like(self, prototype: Any, dtype: Any = None, order: str = "K",
                   shape: int | tuple[int, ...] | None = None) -> np.ndarray:
        """Uninitialised arena array like `prototype` ('K'/'A' keep its C or F layout)."""
        proto = np.asarray(prototype)
        if order in ("K", "A"):
            order = "F" if proto.flags.f_contiguous and not proto.flags.c_contiguous else "C"
        return self.empty(proto.shape if shape is None else shape,
                          proto.dtype if dtype is None else dtype, order)

    def zeros_like(self, prototype: Any, dtype: Any = None, order: str = "K",
                   shape: int | tuple[int, ...] | None = None) -> np.ndarray:
        """Zero-filled arena array like `prototype`."""
        array = self.empty_like(prototype, dtype, order, shape)
        array.fill(0)
        return array

    def asarray(self, data: Any, dtype: Any = None) -> np.ndarray:
        """`data` in arena memory: arena arrays are returned as they are, others copied in."""
        if (isinstance(data, np.ndarray) and (dtype is None or data.dtype == np.dtype(dtype))
                and (owner := _owner(data)) is not None and owner.arena is self
                and owner.handle >= 0):
            return data
        source = np.asarray(data, dtype=dtype)
        array = self.empty_like(source)
        array[...] = source
        return array

    def free(self, array: np.ndarray) -> None:
        """Return an array's block now; the array and its views must not be used afterwards.

        A fallback array (served by Linux) keeps its memory until it dies.
        """
        owner = _owner(array)
        if owner is None or owner.arena is not self:
            raise ValueError("array is not backed by this arena")
        handle = owner.handle
        if handle == _FREED:
            raise ValueError("array was already freed")
        owner.handle = _FREED
        if handle >= 0:
            self._release(handle)

    def _release(self, handle: int) -> None:
        lock = self._lock
        lock.acquire()
        try:
            self._allocator.free(handle)
            if self._closed and not self._allocator.live:
                self._unmap()
        finally:
            lock.release()

    def _exhausted(self, nbytes: int) -> tuple[np.ndarray, int]:
        """Serve a request the arena cannot: from Linux when allowed, else a clear error."""
        if self.fallback != "linux":
            a = self._allocator
            raise ArenaExhausted(
                f"arena exhausted: request of {_human(nbytes)} ({nbytes} bytes) does not fit "
                f"in the {_human(self.size)} arena (in use {_human(a.in_use)}, peak "
                f"{_human(a.peak)}, largest free block {_human(a.largest_free())}); enlarge "
                f"the arena (--mem) or allow fallback to Linux memory (--mem-fallback linux)")
        buffer = np.empty(nbytes + ALIGNMENT, np.uint8)
        address = buffer.ctypes.data
        with self._lock:
            self._fallbacks += 1
            self._fallback_bytes += nbytes
        return buffer, address + (-address % ALIGNMENT)

    # --- accounting and teardown -----------------------------------------------------------

    def stats(self) -> dict[str, int | float | str | bool]:
        """What the arena got at boot and how it has been used (plain values for HDF5)."""
        with self._lock:
            usage = self._allocator.stats()
            fallbacks, fallback_bytes = self._fallbacks, self._fallback_bytes
        return {
            "size": self.size,
            "alignment": ALIGNMENT,
            "allocator": "tlsf",
            "hugepages": self.hugepages,
            "hugepage_reason": self.hugepage_reason,
            "locked": self.locked,
            "lock_reason": self.lock_reason,
            "numa_node": self.numa_node,
            "numa_reason": self.numa_reason,
            "prefault_method": self.prefault_method,
            "prefault_ns": self.prefault_ns,
            **usage,
            "fallbacks": fallbacks,
            "fallback_bytes": fallback_bytes,
        }

    def close(self) -> None:
        """Close the memfd and unmap; with arrays still alive, unmap when the last one dies."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            live = self._allocator.live
        if self.memfd >= 0:
            self._fd_finalizer()
            self.memfd = -1
        if not live:
            self._unmap()

    @property
    def closed(self) -> bool:
        """Whether `close` was called."""
        return self._closed

    def __enter__(self) -> Arena:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self.address:#x}"
        return f"<Arena {_human(self.size)} at {state}, {self.hugepages} pages>"
