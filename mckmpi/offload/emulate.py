"""Executing one rank's system calls in the proxy.

An `Emulator` owns a rank's seccomp listener and serves it from one thread: receive a
notification, run the call here with the rank's cwd/dirfd, umask and open file
descriptions, move data through the rank's arena mapping or its memory, answer with the
exact result and errno the kernel gave the proxy. Calls it does not emulate -- special
files, paths the policy keeps native, descriptors it does not know -- are answered with
SECCOMP_USER_NOTIF_FLAG_CONTINUE so the kernel runs them in the rank.

Ordering of errors: where the proxy must validate something before the kernel sees it (a
buffer it cannot read, an iovec array it cannot parse), it first repeats the call with zero
length on the same descriptor, so a wrong mode (EBADF, EINVAL) wins over EFAULT exactly as
in the kernel's own order of checks.

This module holds the loop and the rank's processes and memory; the handlers live in
`paths` (path calls, opening, duplication) and `data` (data and bookkeeping calls).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import select
import threading
import time
import traceback
from collections.abc import Callable

from mckmpi.linux import check, libc
from mckmpi.offload import accounting, syscalls
from mckmpi.offload.abi import BOUNCE, CONTINUE, SYS, TASK_SIZE, Q
from mckmpi.offload.data import DataCalls
from mckmpi.offload.paths import PathCalls
from mckmpi.offload.policy import Policy
from mckmpi.offload.remote import Gone, Proc, task_facts
from mckmpi.offload.seccomp import (
    IOCTL_NOTIF_ID_VALID,
    IOCTL_NOTIF_RECV,
    IOCTL_NOTIF_SEND,
    NOTIF,
    NOTIF_RESP,
    NOTIF_ZERO,
    USER_NOTIF_FLAG_CONTINUE,
)

_MADV_POPULATE_WRITE = 23
_PWRITE64, _WRITE = SYS["pwrite64"], SYS["write"]
SMALL_WRITE = 64 << 10


class Arena:
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


class Emulator(PathCalls, DataCalls):
    """The proxy side of one registered rank (its listener and everything it forks)."""

    def __init__(self, *, rank: int, pid: int, listener: int, fd_base: int, policy: Policy,
                 arena: Arena | None, log: Callable[[str], None]) -> None:
        self.rank = rank
        self.pid = pid
        self.listener = listener
        self.fd_base = fd_base
        self.policy = policy
        self.arena = arena
        self.log = log
        self.records = accounting.Records(rank)  # written by the serving thread only
        self.passthrough = False   # after detach: everything runs natively
        self.spin_ns = 0           # set by the server (see `serve`)
        self.closing = False
        self.procs: dict[int, Proc] = {}
        self.tids: dict[int, Proc] = {}
        self.lock = threading.Lock()  # guards descriptor caches against the channel thread
        _, umask = task_facts(pid)
        self.procs[pid] = Proc(pid, umask, fd_base)
        self.tids[pid] = self.procs[pid]
        self._bounce = bytearray(BOUNCE)
        self._bview = memoryview(self._bounce)
        self._baddr = ctypes.addressof(ctypes.c_char.from_buffer(self._bounce))
        self._local = ctypes.create_string_buffer(1 << 16)
        self._laddr = ctypes.addressof(self._local)
        self._umask = -1
        self._resp = bytearray(NOTIF_RESP.size)
        self._idbuf = bytearray(8)
        self._handlers: list[Callable[..., int] | None] = [None] * 512
        for row in syscalls.trapped():
            self._handlers[row.nr] = getattr(self, f"_sys_{row.name}")
        # per-call record fields, set by handlers
        self._fd = -1
        self._how = 0
        self._moved = False

    # --- the loop ------------------------------------------------------------------------

    def serve(self) -> None:
        """Answer notifications until `closing` is set or no task uses the filter any more
        (the rank and its children are gone).

        This loop is the proxy's hot path, so it is written out: one record is packed in
        place, the answer is sent inline. Every ioctl gets a preallocated bytearray (given
        immutable bytes, fcntl.ioctl first fails to parse a writable buffer and formats an
        error message, which costs more than the rest of a call's bookkeeping). With
        `spin_ns` the thread polls the listener that long after each call before it
        sleeps in RECV: a rank issuing calls back to back then finds the proxy awake, which
        saves a cross-CPU wake-up per call at the price of a Linux core's cycles.
        """
        _unshare_fs()
        lfd = self.listener
        ioctl = fcntl.ioctl
        unpack_from = NOTIF.unpack_from
        buf = bytearray(NOTIF.size)
        now = time.monotonic_ns
        handlers = self._handlers
        records = self.records
        poller = select.poll()
        poller.register(lfd, select.POLLIN)
        ready = poller.poll
        hup = select.POLLHUP
        emulated, continued = accounting.EMULATED, accounting.CONTINUED
        tids = self.tids
        arena = self.arena
        bview = self._bview
        preadv, pwrite, write = os.preadv, os.pwrite, os.write
        idbuf = self._idbuf
        pack_id = Q.pack_into
        add = records.add
        resp, pack_resp = self._resp, NOTIF_RESP.pack_into
        while not self.closing:
            buf[:] = NOTIF_ZERO
            if self.spin_ns:
                until = now() + self.spin_ns
                while not ready(0) and now() < until:
                    pass
            try:
                ioctl(lfd, IOCTL_NOTIF_RECV, buf)
            except OSError as e:  # EINTR: a stop request; ENOENT: the caller died meanwhile
                if e.errno == errno.ENOENT and any(ev & hup for _, ev in ready(0)):
                    return  # no task uses the filter any more: RECV would fail at once forever
                if e.errno in (errno.EINTR, errno.ENOENT):
                    continue
                raise
            t0 = now()
            nid, tid, _, nr, _, _, a0, a1, a2, a3, a4, a5 = unpack_from(buf)
            if (nr == _PWRITE64 or nr == _WRITE) and not self.passthrough:
                # Fast path for the commonest call, a small write from ordinary memory to a
                # known descriptor: the same steps as _sys_pwrite64/_write_from, without
                # their call frames (a microsecond per call). Anything else falls through.
                proc = tids.get(tid)
                fd = a0 & 0xFFFFFFFF
                entry = proc.fds.get(fd) if proc is not None else None
                if (entry is not None and entry[1] and 0 < a2 <= SMALL_WRITE
                        and (nr == _WRITE or not a3 >> 63)
                        and (arena is None or not arena.address <= a1 < arena.end)):
                    view = bview[:a2]
                    try:
                        got = preadv(proc.mem, [view], a1)
                    except OSError:
                        got = 0
                    if got == a2:
                        pack_id(idbuf, 0, nid)
                        try:
                            ioctl(lfd, IOCTL_NOTIF_ID_VALID, idbuf)
                        except OSError:
                            self._continue(nid)  # the caller is gone (or let the kernel try)
                            continue
                        try:
                            res = pwrite(entry[0], view, a3) if nr == _PWRITE64 else write(entry[0], view)
                        except OSError as e:
                            res = -e.errno
                        t1 = now()
                        if res >= 0:
                            add(t0, t1, res, res, tid, fd, 0, nr, emulated)
                            pack_resp(resp, 0, nid, res, 0, 0)
                        else:
                            add(t0, t1, 0, -1, tid, fd, -res, nr, emulated)
                            pack_resp(resp, 0, nid, 0, res, 0)
                        try:  # the answer, as _send gives it
                            ioctl(lfd, IOCTL_NOTIF_SEND, resp)
                        except OSError as e:
                            if e.errno != errno.ENOENT:
                                self.log(f"rank {self.rank}: answering "
                                         f"{syscalls.name_of(nr)}: {e}")
                        continue
            handler = handlers[nr] if 0 <= nr < 512 else None
            if self.passthrough or handler is None:
                self._continue(nid)
                continue
            self._fd, self._how, self._moved = -1, emulated, False
            try:
                res = handler(nid, tid, a0, a1, a2, a3, a4, a5)
            except Gone:  # the caller vanished; if it did not, let the kernel run the call
                self._continue(nid)
                continue
            except OSError as e:
                res = -e.errno
            except Exception:  # noqa: BLE001 -- a bug must not hang the rank: log, run natively
                self.log(f"rank {self.rank}: {syscalls.name_of(nr)} failed in the proxy, "
                         f"running it natively:\n{traceback.format_exc()}")
                res = CONTINUE
            # the record goes in before the answer: once answered, the rank may detach
            t1 = now()
            if res == CONTINUE:
                records.add(t0, t1, 0, 0, tid, self._fd, 0, nr, continued)
                self._continue(nid)
                continue
            if res >= 0:
                records.add(t0, t1, res if self._moved else 0, res, tid, self._fd, 0, nr,
                            self._how)
            else:
                records.add(t0, t1, 0, -1, tid, self._fd, -res, nr, self._how)
            self._send(nid, res, nr)

    def _send(self, nid: int, res: int, nr: int, flags: int = 0) -> None:
        """Answer with a result (>= 0), an error (-errno) or, with flags, CONTINUE."""
        if res >= 0:
            NOTIF_RESP.pack_into(self._resp, 0, nid, res, 0, flags)
        else:
            NOTIF_RESP.pack_into(self._resp, 0, nid, 0, res, 0)
        try:
            fcntl.ioctl(self.listener, IOCTL_NOTIF_SEND, self._resp)
        except OSError as e:  # ENOENT: the caller was killed meanwhile, which is normal
            if e.errno != errno.ENOENT:
                self.log(f"rank {self.rank}: answering {syscalls.name_of(nr)}: {e}")

    def _continue(self, nid: int, nr: int = -1) -> None:
        self._send(nid, 0, nr, USER_NOTIF_FLAG_CONTINUE)

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
        self.tids[tid] = proc
        return proc

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
        Q.pack_into(self._idbuf, 0, nid)
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
            if proc is None:
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


_CLONE_FS = 0x200


def _unshare_fs() -> None:
    """Give the calling thread its own cwd and umask, so it can adopt the rank's."""
    check(libc.unshare(_CLONE_FS), "unshare(CLONE_FS)")
