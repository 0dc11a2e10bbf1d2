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
from typing import Any

import numpy as np

from mckmpi import linux
from mckmpi.errors import FeatureUnavailable, UsageError
from mckmpi.linux import libc
from mckmpi.lwk.tlsf import ALIGNMENT, Allocator
from mckmpi.node.host import available_memory, meminfo, online_nodes, shmem_thp

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


def _human(nbytes: int) -> str:
    """A byte count for messages: '64 B', '1.5 MiB'."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.4g} {unit}"
    return f"{nbytes} B"


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




def bind_memory(address: int, length: int, node: int) -> None:
    """mbind(MPOL_BIND) a page-aligned range to one NUMA node (glibc has no wrapper)."""
    nr = _NR_MBIND.get(platform.machine())
    if nr is None:
        raise FeatureUnavailable(f"NUMA binding: mbind number unknown on {platform.machine()}")
    words = node // 64 + 1
    mask = (ctypes.c_ulong * words)()
    mask[node // 64] = 1 << (node % 64)
    rc = libc.syscall(ctypes.c_long(nr), ctypes.c_void_p(address), ctypes.c_ulong(length),
                       ctypes.c_long(_MPOL_BIND), mask, ctypes.c_ulong(words * 64 + 1),
                       ctypes.c_uint(_MPOL_MF_STRICT | _MPOL_MF_MOVE))
    if rc != 0:
        err = linux.errno()
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
        info = meminfo()
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
        thp_possible, thp_setting = shmem_thp()
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
        available, source = available_memory(meminfo())
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
        if libc.mlock(self.address, self.size) == 0:
            self.locked = True
            self.lock_reason = f"mlock; {limit}"
            return
        self.lock_reason = f"mlock failed: {os.strerror(linux.errno())}; {limit}"
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
