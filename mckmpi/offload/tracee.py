"""The tracee: one rank, and every process it forks, as the proxy keeps track of it.

The filter covers the rank and everything it forks, so the proxy keys state by process
(thread-group id): a forked child has its own descriptor table and address space. The
proxy keeps, per process (`Proc`),

* a pidfd (liveness, and `pidfd_getfd` to fetch a descriptor the proxy did not install:
  inherited by a child, or a dirfd the rank opened natively),
* an fd of its memory (`remote.open_memory`), reopened after an execve,
* the cache of offloaded descriptors: rank fd number -> (proxy's duplicate, emulate?).
  The duplicate shares the rank's open file description, so offsets and flags are one;
* whether the process runs natively (`native`, the reason): its identity differs from
  the proxy's (see `identity`), so the proxy may execute none of its calls;
* whether a standard stream (0-2) may be closed (`std_gap`): the next new descriptor then
  takes its number, as POSIX says.

`Tracee` holds a rank's processes (by tgid and by tid), its arena mapping and the copy
buffers, and reads or writes the rank's memory for the handlers: `_peek` and `_cstring`
validate the notification after reading (the data must come from the task that trapped),
`_poke` before writing.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import resource
import select
import stat
import struct
import threading
from collections.abc import Callable

from mckmpi.offload import accounting
from mckmpi.offload.failures import Failures
from mckmpi.offload.kernel_abi import TASK_SIZE
from mckmpi.offload.policy import Policy
from mckmpi.offload.remote import (
    IOV2,
    ArenaMapping,
    open_memory,
    read_memory,
    write_memory,
)
from mckmpi.offload.seccomp import IOCTL_NOTIF_ID_VALID, pidfd_getfd, pidfd_open

#: a handler result that is not a syscall result: let the kernel run the call in the rank
CONTINUE = -(1 << 40)
#: the proxy's copy buffer for non-arena data, per rank
BOUNCE = 4 << 20
#: a notification id, as SECCOMP_IOCTL_NOTIF_ID_VALID takes it
ID = struct.Struct("<Q")

#: An entry of a process's descriptor cache: (proxy's duplicate, emulate it?)
Entry = tuple[int, bool]


class Gone(Exception):
    """The process went away while the proxy was looking at it."""


class Proc:
    """State of one process (thread group) under a rank's filter."""

    __slots__ = ("_iov", "_iov_addr", "base", "fds", "low", "mem", "native", "pidfd", "std_gap",
                 "tgid", "umask")

    def __init__(self, tgid: int, umask: int, fd_base: int) -> None:
        self.tgid = tgid
        self.pidfd = pidfd_open(tgid)
        try:
            self.mem = open_memory(tgid)
        except OSError:
            os.close(self.pidfd)
            raise
        self.fds: dict[int, Entry] = {}
        self.umask = umask
        self.base = fd_base
        self.low = fd_base
        self.native = ""     # why the process runs natively; "" while the proxy serves it
        self.std_gap = True  # not known yet whether 0, 1 and 2 are open
        self._iov = ctypes.create_string_buffer(IOV2.size)
        self._iov_addr = ctypes.addressof(self._iov)

    def alive(self) -> bool:
        return not select.select([self.pidfd], [], [], 0)[0]

    def reopen_mem(self) -> None:
        """After an execve the old /proc/<pid>/mem reads nothing: open the new image's."""
        fd = open_memory(self.tgid)
        os.close(self.mem)
        self.mem = fd

    def read(self, addr: int, into: memoryview) -> int:
        """Copy rank memory at `addr` into `into`; bytes copied (short at an unmapped page)."""
        n = read_memory(self.mem, addr, into)
        if n == 0 and len(into):  # nothing at all: maybe the process exec'd a new image
            try:
                self.reopen_mem()
            except OSError:
                return 0
            n = read_memory(self.mem, addr, into)
        return n

    def write(self, addr: int, local_addr: int, n: int) -> int:
        """Copy `n` bytes at proxy address `local_addr` to rank address `addr`."""
        if n == 0:
            return 0
        return write_memory(self.tgid, self._iov, self._iov_addr, local_addr, addr, n)

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

    def release(self, slot: int) -> None:
        """A number `free_slot` gave out was not used after all: it is free again."""
        self.low = min(self.low, slot)

    def std_hole(self, minimum: int) -> int | None:
        """The standard stream number POSIX gives a new descriptor (the lowest free one
        >= minimum, when that is 0, 1 or 2), else None: the offload range serves.

        Programs count on these numbers (close(1); dup(f) redirects output; a daemon opens
        /dev/null after close(0)); any other number POSIX would give is one the program
        cannot predict (libraries and MPI hold descriptors), so it is taken from the range.
        """
        if not self.std_gap or minimum > 2:
            return None
        for n in range(minimum, 3):
            if not os.path.lexists(f"/proc/{self.tgid}/fd/{n}"):
                return n
        if minimum == 0:
            self.std_gap = False  # until a standard stream is closed (the filter sees it)
        return None

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


#: the lines of /proc/<tid>/status that decide what a task may do with files
_IDENTITY_KEYS = (b"Uid:", b"Gid:", b"Groups:", b"CapInh:", b"CapPrm:", b"CapEff:", b"CapBnd:",
                  b"CapAmb:")


def identity(tid: int) -> tuple[object, ...]:
    """What decides the outcome of a file call made by task `tid`, besides its cwd and umask
    (which the proxy adopts per call): real, effective, saved and fs uids and gids,
    supplementary groups, capability sets, fs root, mount and user namespaces, and
    RLIMIT_FSIZE. Two tasks with equal identities get the same answer from the kernel."""
    with open(f"/proc/{tid}/status", "rb") as f:
        lines = tuple(line for line in f.read().splitlines() if line.startswith(_IDENTITY_KEYS))
    root = os.stat(f"/proc/{tid}/root")
    spaces = tuple(os.stat(f"/proc/{tid}/ns/{ns}").st_ino for ns in ("mnt", "user"))
    return lines, (root.st_dev, root.st_ino), spaces, resource.prlimit(tid, resource.RLIMIT_FSIZE)


def differs(tid: int, reference: tuple[object, ...]) -> str:
    """Why task `tid` cannot be served with the `reference` identity ("" if it can)."""
    try:
        mine = identity(tid)
    except OSError as e:
        return f"its identity cannot be read ({e.strerror})"
    what = ("credentials or capabilities", "fs root", "namespaces", "RLIMIT_FSIZE")
    for name, a, b in zip(what, mine, reference, strict=True):
        if a != b:
            return f"its {name} differ from the proxy's"
    if mine[3][0] != resource.RLIM_INFINITY:  # its SIGXFSZ would hit the proxy
        return "its RLIMIT_FSIZE is finite"
    return ""


class Tracee:
    """The proxy's state of one registered rank (its listener and every process it forks):
    processes, descriptors, memory. The call handlers (`paths`, `data`) extend it and the
    serving loop (`loop.Emulator`) runs them."""

    def __init__(self, *, rank: int, pid: int, listener: int, fd_base: int, policy: Policy,
                 arena: ArenaMapping | None, log: Callable[[str], None]) -> None:
        self.rank = rank
        self.pid = pid
        self.listener = listener
        self.fd_base = fd_base
        self.policy = policy
        self.arena = arena
        self.log = log
        self.records = accounting.Records(rank)  # written by the serving thread only
        self.failures = Failures(rank, log)  # the proxy's own, on this rank's calls
        self.procs: dict[int, Proc] = {}
        self.tids: dict[int, Proc] = {}
        self.lock = threading.Lock()  # guards descriptor caches against the channel thread
        _, umask = task_facts(pid)
        self.reference = identity(os.getpid())  # what the proxy's own calls are made with
        self.procs[pid] = Proc(pid, umask, fd_base)
        self.tids[pid] = self.procs[pid]
        self.procs[pid].native = differs(pid, self.reference)
        if self.procs[pid].native:
            log(f"rank {rank}: its calls run natively: {self.procs[pid].native}")
        self._bounce = bytearray(BOUNCE)
        self._bview = memoryview(self._bounce)
        self._baddr = ctypes.addressof(ctypes.c_char.from_buffer(self._bounce))
        self._local = ctypes.create_string_buffer(1 << 16)
        self._laddr = ctypes.addressof(self._local)
        self._openhow = ctypes.create_string_buffer(24)  # struct open_how of the proxy's walks
        self._openhow_addr = ctypes.addressof(self._openhow)
        self._statfs = ctypes.create_string_buffer(120)  # struct statfs
        self._statfs_addr = ctypes.addressof(self._statfs)
        self._umask = -1
        self._idbuf = bytearray(8)
        # per-call record fields, set by handlers
        self._fd = -1
        self._how = 0
        self._moved = False

    def release(self) -> None:
        """Free everything the rank held here (descriptors, mappings, listener)."""
        with self.lock:
            for proc in self.procs.values():
                proc.close()
            self.procs.clear()
            self.tids.clear()
        if self.arena is not None:
            self.arena.close()
            self.arena = None
        os.close(self.listener)

    # --- processes, descriptors, memory --------------------------------------------------

    def _proc(self, nid: int, tid: int) -> Proc:
        proc = self.tids.get(tid)
        if proc is not None:
            return proc
        tgid, umask = task_facts(tid)
        if not self._valid(nid):
            raise Gone(f"task {tid}")
        proc = self.procs.get(tgid)
        if proc is None:
            self._sweep()
            with self.lock:
                proc = self.procs[tgid] = Proc(tgid, umask, self.fd_base)
            # a new process (forked, or in a new namespace): served only as the proxy
            proc.native = differs(tid, self.reference)
        self.tids[tid] = proc
        return proc

    def _go_native(self, proc: Proc, why: str) -> None:
        """From now on the kernel runs every call of `proc` (see `loop`)."""
        with self.lock:
            proc.forget_all()  # its descriptors stay valid: they are the rank's own
            proc.native = why
        self._how |= accounting.NATIVE_TASK

    def _sweep(self) -> None:
        """Drop processes (other than the rank itself) that have exited."""
        dead = [p for t, p in self.procs.items() if t != self.pid and not p.alive()]
        if not dead:
            return
        with self.lock:
            for p in dead:
                del self.procs[p.tgid]
                p.close()
            self.tids = {t: p for t, p in self.tids.items() if p.tgid in self.procs}

    def _entry(self, proc: Proc, fd: int) -> tuple[int, bool] | None:
        fd &= 0xFFFFFFFF
        entry = proc.fds.get(fd)
        if entry is None:
            entry = proc.fetch(fd)
            if entry is not None:
                with self.lock:
                    proc.fds[fd] = entry
        return entry

    def _valid(self, nid: int) -> bool:
        ID.pack_into(self._idbuf, 0, nid)
        try:
            fcntl.ioctl(self.listener, IOCTL_NOTIF_ID_VALID, self._idbuf)
        except OSError:
            return False
        return True

    def _peek(self, proc: Proc, nid: int, addr: int, n: int) -> memoryview | None:
        """n bytes of rank memory at addr: a view of the arena, or a bounce-buffer copy.

        None if nothing is readable. Reading through /proc/<pid>/mem is followed by
        SECCOMP_IOCTL_NOTIF_ID_VALID: the data must come from the task that trapped.
        """
        arena = self.arena
        if arena is not None and arena.address <= addr and addr + n <= arena.end:
            self._how |= accounting.ZERO_COPY
            off = addr - arena.address
            return arena.view[off:off + n]
        if addr + n > TASK_SIZE:
            return None
        view = self._bview[:n] if n <= BOUNCE else memoryview(bytearray(n))
        got = proc.read(addr, view)
        if not self._valid(nid):
            raise Gone(f"notification {nid}")
        return view[:got] if got else None

    def _poke(self, proc: Proc, nid: int, addr: int, local_addr: int, n: int) -> bool:
        """Copy n bytes from proxy memory to the rank; False if the rank buffer is bad."""
        if not self._valid(nid):
            raise Gone(f"notification {nid}")
        return proc.write(addr, local_addr, n) == n

    def _cstring(self, proc: Proc, nid: int, addr: int) -> bytes | int:
        """A NUL-terminated path from rank memory, or -EFAULT / -ENAMETOOLONG."""
        if addr == 0 or addr >= TASK_SIZE:
            return -errno.EFAULT
        view = self._bview
        got = 0
        while got < 4096:
            # read to the end of the page, so an unmapped next page is not touched
            want = min(4096 - got, mmap.PAGESIZE - (addr + got) % mmap.PAGESIZE)
            n = proc.read(addr + got, view[got:got + want])
            end = self._bounce.find(0, got, got + n)
            if end >= 0:
                if not self._valid(nid):
                    raise Gone(f"notification {nid}")
                return bytes(view[:end])
            got += n
            if n < want:
                return -errno.EFAULT
        return -errno.ENAMETOOLONG

    def _umask_for(self, proc: Proc) -> None:
        if self._umask != proc.umask:
            os.umask(proc.umask)
            self._umask = proc.umask

    # --- channel support -----------------------------------------------------------------

    def dup_of(self, fd: int) -> int | None:
        """A private duplicate of the rank's offloaded `fd` (for the async channel)."""
        with self.lock:
            proc = self.procs.get(self.pid)
            if proc is None or proc.native:
                return None
            entry = proc.fds.get(fd)
            if entry is not None:
                return os.dup(entry[0]) if entry[1] else None
        entry = proc.fetch(fd)
        if entry is None:
            return None
        if not entry[1]:
            os.close(entry[0])
            return None
        return entry[0]

