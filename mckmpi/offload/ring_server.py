"""The proxy's end of the asynchronous request ring (see `ring`): a thread per ring that
performs a rank's queued writes, reads and fsyncs straight from the proxy's arena mapping."""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import threading
import time
from collections.abc import Callable

from mckmpi.offload import accounting, ring, syscalls
from mckmpi.offload.errors import OffloadError
from mckmpi.offload.tracee import Tracee

_PWRITE = syscalls.table()["pwrite64"].nr
_PREAD = syscalls.table()["pread64"].nr
_FSYNC = syscalls.table()["fsync"].nr
_CALLS = {ring.OP_WRITE: _PWRITE, ring.OP_READ: _PREAD, ring.OP_FSYNC: _FSYNC}


class ChannelServer:
    """The proxy's end: a thread that drains a rank's ring (layout and protocol: `ring`)."""

    def __init__(self, emulator: Tracee, ringfd: int, doorbell: int, completion: int,
                 log: Callable[[str], None]) -> None:
        self.emulator = emulator
        self.log = log
        size = os.fstat(ringfd).st_size
        try:
            self._ring = mmap.mmap(ringfd, size, flags=mmap.MAP_SHARED)
        finally:
            os.close(ringfd)
        _, _, slots, magic = ring.HDR.unpack_from(self._ring, 0)
        if magic != ring.MAGIC or slots < 1 or ring.ring_size(slots) > size:
            self._ring.close()
            os.close(doorbell)
            os.close(completion)
            raise OffloadError("malformed channel ring")
        self.slots = slots
        self.records = accounting.Records(emulator.rank)  # this thread's own rows
        self._doorbell = doorbell
        self._completion = completion
        self._stopping = False
        self._posted = False  # the request being executed has its completion in the ring
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"channel{emulator.rank}")
        self._thread.start()

    def _run(self) -> None:
        """Drain the ring until `stop`. Every request submitted gets a completion: a
        failure of this thread on one request is answered there (`_rescue`), and one
        outside a request (the doorbell, a bug) is counted and logged, and after a pause
        the thread looks at the ring again without waiting for the doorbell, so that a rank
        waiting for completions never waits forever. A
        head the rank corrupted ends the channel (the rank broke its own ring)."""
        done = ring.HEAD.unpack_from(self._ring, 8)[0]
        retry = False  # after a failure: look at the ring again without waiting for a ring
        while not self._stopping:
            try:
                if not retry:
                    os.eventfd_read(self._doorbell)
                retry = False
                if self._stopping:
                    return
                head = ring.HEAD.unpack_from(self._ring, 0)[0]
                if not done <= head <= done + self.slots:
                    self.log(f"rank {self.emulator.rank}: channel head {head} is corrupt; "
                             "closing it")
                    return
                dups: dict[int, int | None] = {}
                try:
                    while done < head:
                        self._posted = False
                        try:
                            self._execute(done, dups)
                        except Exception as e:  # noqa: BLE001 -- answer it, go on
                            self._rescue(done, e)
                        done += 1
                        ring.HEAD.pack_into(self._ring, 8, done)
                finally:
                    for dup in dups.values():
                        if dup is not None:
                            os.close(dup)
                os.eventfd_write(self._completion, 1)
            except Exception as e:  # noqa: BLE001 -- the channel must outlive its own bugs
                with contextlib.suppress(Exception):  # a log that cannot be written
                    self.emulator.failures.report("the channel", e, "nothing (between requests)")
                time.sleep(0.01)
                retry = True

    def _rescue(self, seq: int, exc: Exception) -> None:
        """Complete request `seq` that this thread failed on: with its result if that was
        posted (the I/O happened; only its record failed), else with EIO -- a ring request
        has no native fallback, the rank asked the proxy to do it and the proxy could not,
        which is what EIO says; the write (or read) did not happen or its outcome is not
        known. Then count and log the failure and record it (`accounting.FAILED`)."""
        base = ring.HEADER + (seq % self.slots) * ring.SLOT
        now = time.monotonic_ns()
        posted = self._posted
        answer = "its result" if posted else "EIO"
        with contextlib.suppress(Exception):  # the record buffer itself may be what failed
            if not posted:
                ring.DONE.pack_into(self._ring, base + ring.DONE_AT, -errno.EIO, now, now)
            result = ring.DONE.unpack_from(self._ring, base + ring.DONE_AT)[0]
            _, op, fd, _, _, _ = ring.REQ.unpack_from(self._ring, base)
            self.records.add(now, now, 0, result if result >= 0 else -1, self.emulator.pid, fd,
                             -result if result < 0 else 0, _CALLS.get(op, 0),
                             accounting.CHANNEL | accounting.FAILED
                             | (accounting.EMULATED if posted else 0))
        with contextlib.suppress(Exception):  # a log that cannot be written must not stop it
            self.emulator.failures.report("a channel request", exc, answer)

    def _execute(self, seq: int, dups: dict[int, int | None]) -> None:
        base = ring.HEADER + (seq % self.slots) * ring.SLOT
        _, op, fd, offset, aoff, length = ring.REQ.unpack_from(self._ring, base)
        t0 = time.monotonic_ns()
        emu = self.emulator
        arena = emu.arena
        if fd not in dups:
            try:
                dups[fd] = emu.dup_of(fd)
            except OSError:
                dups[fd] = None
        pfd = dups[fd]
        call = _CALLS.get(op, 0)
        how = accounting.EMULATED | accounting.CHANNEL
        try:
            if pfd is None:
                result = -errno.EBADF  # not an offloaded regular file of this rank
            elif op == ring.OP_FSYNC:
                os.fsync(pfd)
                result = 0
            elif op not in (ring.OP_WRITE, ring.OP_READ):
                result = -errno.EINVAL
            elif arena is None or aoff + length > arena.end - arena.address:
                result = -errno.EFAULT
            else:
                how |= accounting.ZERO_COPY
                view = arena.view[aoff:aoff + length]
                if op == ring.OP_WRITE:
                    result = os.pwrite(pfd, view, offset)
                else:
                    result = os.preadv(pfd, [view], offset)
        except OSError as e:
            result = -e.errno
        t1 = time.monotonic_ns()
        ring.DONE.pack_into(self._ring, base + ring.DONE_AT, result, t0, t1)
        self._posted = True
        moved = result if result > 0 and op != ring.OP_FSYNC else 0
        self.records.add(t0, t1, moved, result if result >= 0 else -1, emu.pid, fd,
                        -result if result < 0 else 0, call, how)

    def stop(self) -> None:
        self._stopping = True
        os.eventfd_write(self._doorbell, 1)
        self._thread.join(5)
        self._ring.close()
        os.close(self._doorbell)
        os.close(self._completion)
