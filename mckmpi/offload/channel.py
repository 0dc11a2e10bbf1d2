"""Asynchronous offload: a shared-memory request ring between a rank and its proxy.

McKernel's IKC queue in miniature. A rank (typically a scheduler task) submits "write these
arena bytes to fd at offset" and carries on computing; the proxy performs the write on a
Linux core straight from its mapping of the arena (no copy, no trap), and posts the result
in the same slot. Completion is *polled* -- `Channel.poll` is a scheduler poller that reads
one counter -- so the rank takes no interrupt and makes no system call to learn about it.

Ring (a memfd both sides map), 64-byte header then `slots` 64-byte slots:

    header: u64 head (rank: requests submitted)   u64 done (proxy: requests completed)
            u32 slots                            u32 magic
    slot:   u64 seq  u32 op  i32 fd  i64 offset  u64 arena_off  u64 length
            i64 result (>= 0, or -errno)  i64 start_ns  i64 done_ns

Each counter has a single writer and only grows; a slot is written completely before the
counter that publishes it, and x86-64 keeps stores (and loads) in program order, so a
reader that sees a counter sees the slot behind it. (This is why the table refuses other
architectures: Python cannot issue the fences a weaker memory model would need.)

Doorbell: an eventfd passed with SCM_RIGHTS. The rank writes it after each submission (one
native syscall on a low descriptor, never trapped); the proxy's channel thread sleeps in
read() on it. An eventfd rather than a futex because it needs no atomic instructions from
Python, it counts (several rings while the proxy is busy cost one wake-up), and it can be
passed over the socket. Skipping the ring when the proxy is awake would need a store-load
fence on both sides, which Python cannot emit; for checkpoint-sized writes one eventfd
write per request is noise. A second eventfd counts completions for a rank that wants to
block (`wait`) instead of polling.
"""

from __future__ import annotations

import errno
import mmap
import os
import select
import struct
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from mckmpi.offload import accounting, syscalls
from mckmpi.offload.errors import OffloadError

if TYPE_CHECKING:
    from mckmpi.offload.client import OffloadSession
    from mckmpi.offload.emulate import Emulator

MAGIC = 0x4D434B31  # "MCK1"
HEADER = 64
SLOT = 64
OP_WRITE, OP_READ, OP_FSYNC = 1, 2, 3
_HEAD = struct.Struct("<Q")
_HDR = struct.Struct("<QQII")
_REQ = struct.Struct("<QIiqQQ")
_DONE = struct.Struct("<qqq")
_DONE_AT = 40
_PWRITE = syscalls.table()["pwrite64"].nr
_PREAD = syscalls.table()["pread64"].nr
_FSYNC = syscalls.table()["fsync"].nr


def ring_size(slots: int) -> int:
    return HEADER + slots * SLOT


class Channel:
    """The rank's end of an asynchronous request ring (see the module docstring)."""

    def __init__(self, session: OffloadSession, slots: int = 64) -> None:
        if slots < 1 or slots & (slots - 1):
            raise ValueError(f"slots must be a power of two, got {slots}")
        if session.arena_address is None:
            raise OffloadError("an asynchronous channel needs the rank's arena")
        self.slots = slots
        self.arena_address = session.arena_address
        self.arena_size = session.arena_size
        self._ringfd = os.memfd_create("mckmpi-offload-ring", os.MFD_CLOEXEC)
        os.ftruncate(self._ringfd, ring_size(slots))
        self._ring = mmap.mmap(self._ringfd, ring_size(slots), flags=mmap.MAP_SHARED)
        _HDR.pack_into(self._ring, 0, 0, 0, slots, MAGIC)
        self._counters = memoryview(self._ring)[:16].cast("Q")  # head, done
        self._doorbell = os.eventfd(0, os.EFD_CLOEXEC)
        self._completion = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._head = 0
        self._seen = 0
        self._callbacks: dict[int, Callable[[int], Any]] = {}
        self._results: dict[int, int] = {}
        session.request({"op": "channel", "slots": slots},
                        [self._ringfd, self._doorbell, self._completion])

    # --- submitting ----------------------------------------------------------------------

    def submit(self, op: int, fd: int, offset: int, arena_offset: int, length: int,
               on_done: Callable[[int], Any] | None = None) -> int:
        """Queue one request; returns its ticket. Blocks only while the ring is full."""
        if op in (OP_WRITE, OP_READ) and not (
                0 <= arena_offset and arena_offset + length <= self.arena_size):
            raise ValueError(f"[{arena_offset}, {arena_offset + length}) is outside the arena")
        while self._head - self._seen >= self.slots:
            if not self.poll():
                self._block(0.01)
        seq = self._head
        _REQ.pack_into(self._ring, HEADER + (seq % self.slots) * SLOT, seq, op, fd, offset,
                       arena_offset, length)
        self._head = seq + 1
        self._counters[0] = self._head  # publish after the slot is complete
        os.eventfd_write(self._doorbell, 1)
        if on_done is not None:
            self._callbacks[seq] = on_done
        return seq

    def write(self, fd: int, offset: int, array: np.ndarray,
              on_done: Callable[[int], Any] | None = None) -> int:
        """Queue a write of a contiguous arena array to `fd` at `offset`."""
        return self.submit(OP_WRITE, fd, offset, self._arena_offset(array), array.nbytes, on_done)

    def read(self, fd: int, offset: int, array: np.ndarray,
             on_done: Callable[[int], Any] | None = None) -> int:
        """Queue a read from `fd` at `offset` into a contiguous arena array."""
        return self.submit(OP_READ, fd, offset, self._arena_offset(array), array.nbytes, on_done)

    def fsync(self, fd: int, on_done: Callable[[int], Any] | None = None) -> int:
        return self.submit(OP_FSYNC, fd, 0, 0, 0, on_done)

    def _arena_offset(self, array: np.ndarray) -> int:
        if not array.flags.c_contiguous:
            raise ValueError("channel I/O needs a C-contiguous array")
        addr = array.__array_interface__["data"][0]
        off = addr - self.arena_address
        if off < 0 or off + array.nbytes > self.arena_size:
            raise ValueError("channel I/O needs an array that lives in the rank's arena")
        return off

    # --- completion ----------------------------------------------------------------------

    def poll(self) -> bool:
        """Collect completions (no system call); True if any arrived. A scheduler poller."""
        done = self._counters[1]
        if done == self._seen:
            return False
        for seq in range(self._seen, done):
            result = _DONE.unpack_from(self._ring, HEADER + (seq % self.slots) * SLOT + _DONE_AT)[0]
            callback = self._callbacks.pop(seq, None)
            if callback is not None:
                callback(result)
            else:
                self._results[seq] = result
        self._seen = done
        return True

    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet collected by `poll`."""
        return self._head - self._seen

    def pending(self) -> bool:
        """Whether requests are still in flight (for the scheduler's deadlock check)."""
        return self._seen < self._head

    def result(self, ticket: int) -> int | None:
        """Result of a request submitted without a callback (>= 0 or -errno), None if not done."""
        self.poll()
        return self._results.pop(ticket, None) if ticket < self._seen else None

    def wait(self, ticket: int | None = None, timeout: float | None = None) -> None:
        """Block until `ticket` (default: everything submitted) has completed."""
        target = self._head if ticket is None else ticket + 1
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() or self._seen < target:
            if self._seen >= target:
                return
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"channel request {target - 1} not completed in {timeout} s")
            self._block(0.05)

    def _block(self, seconds: float) -> None:
        select.select([self._completion], [], [], seconds)
        try:
            os.eventfd_read(self._completion)
        except BlockingIOError:
            pass

    def register(self, scheduler: Any) -> None:
        """Let an LWK scheduler poll this channel when it has nothing ready."""
        scheduler.add_poller(self.poll, pending=self.pending)

    def close(self) -> None:
        """Wait for outstanding requests, then release the ring."""
        self.wait()
        self._counters.release()
        self._ring.close()
        for fd in (self._ringfd, self._doorbell, self._completion):
            os.close(fd)


class ChannelServer:
    """The proxy's end: a thread that drains a rank's ring (see the module docstring)."""

    def __init__(self, emulator: Emulator, ringfd: int, doorbell: int, completion: int,
                 log: Callable[[str], None]) -> None:
        self.emulator = emulator
        self.log = log
        size = os.fstat(ringfd).st_size
        try:
            self._ring = mmap.mmap(ringfd, size, flags=mmap.MAP_SHARED)
        finally:
            os.close(ringfd)
        _, _, slots, magic = _HDR.unpack_from(self._ring, 0)
        if magic != MAGIC or slots < 1 or ring_size(slots) > size:
            self._ring.close()
            os.close(doorbell)
            os.close(completion)
            raise OffloadError("malformed channel ring")
        self.slots = slots
        self.records = accounting.Records(emulator.rank)  # this thread's own rows
        self._doorbell = doorbell
        self._completion = completion
        self._stopping = False
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"channel{emulator.rank}")
        self._thread.start()

    def _run(self) -> None:
        done = _HEAD.unpack_from(self._ring, 8)[0]
        while True:
            os.eventfd_read(self._doorbell)
            if self._stopping:
                return
            head = _HEAD.unpack_from(self._ring, 0)[0]
            if not done <= head <= done + self.slots:
                self.log(f"rank {self.emulator.rank}: channel head {head} is corrupt; closing it")
                return
            dups: dict[int, int | None] = {}
            try:
                while done < head:
                    self._execute(done, dups)
                    done += 1
                    _HEAD.pack_into(self._ring, 8, done)
            finally:
                for dup in dups.values():
                    if dup is not None:
                        os.close(dup)
            os.eventfd_write(self._completion, 1)

    def _execute(self, seq: int, dups: dict[int, int | None]) -> None:
        base = HEADER + (seq % self.slots) * SLOT
        _, op, fd, offset, aoff, length = _REQ.unpack_from(self._ring, base)
        t0 = time.monotonic_ns()
        emu = self.emulator
        arena = emu.arena
        if fd not in dups:
            try:
                dups[fd] = emu.dup_of(fd)
            except OSError:
                dups[fd] = None
        pfd = dups[fd]
        call = {OP_WRITE: _PWRITE, OP_READ: _PREAD, OP_FSYNC: _FSYNC}.get(op, 0)
        how = accounting.EMULATED | accounting.CHANNEL
        try:
            if pfd is None:
                result = -errno.EBADF  # not an offloaded regular file of this rank
            elif op == OP_FSYNC:
                os.fsync(pfd)
                result = 0
            elif op not in (OP_WRITE, OP_READ):
                result = -errno.EINVAL
            elif arena is None or aoff + length > arena.end - arena.address:
                result = -errno.EFAULT
            else:
                how |= accounting.ZERO_COPY
                view = arena.view[aoff:aoff + length]
                if op == OP_WRITE:
                    result = os.pwrite(pfd, view, offset)
                else:
                    result = os.preadv(pfd, [view], offset)
        except OSError as e:
            result = -e.errno
        t1 = time.monotonic_ns()
        _DONE.pack_into(self._ring, base + _DONE_AT, result, t0, t1)
        moved = result if result > 0 and op != OP_FSYNC else 0
        self.records.add(t0, t1, moved, result if result >= 0 else -1, emu.pid, fd,
                        -result if result < 0 else 0, call, how)

    def stop(self) -> None:
        self._stopping = True
        os.eventfd_write(self._doorbell, 1)
        self._thread.join(5)
        self._ring.close()
        os.close(self._doorbell)
        os.close(self._completion)
