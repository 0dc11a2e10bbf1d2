"""The proxy's notification loop for one rank, and the dispatch to its call handlers.

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

This module holds the loop; the handlers live in `paths` (path calls, opening,
duplication) and `data` (data and bookkeeping calls), on top of `tracee` (the rank's
processes, descriptors and memory), which reads and writes through `remote`.

Identity per call: the proxy serves a process only while the process's identity (the
credentials, capabilities, fs root, namespaces and RLIMIT_FSIZE of `tracee.identity`)
equals the proxy's own, so every call it executes is one the caller could have made with
the same outcome; cwd and umask are the caller's on every call. The filter traps every
call that changes an identity (the ``identity`` rows of the syscall table); the process
that makes one, and every process first seen with an identity unlike the proxy's, runs
natively from then on: its calls are answered with CONTINUE, which is always correct
(only not offloaded). This is McKernel's answer turned around: there, setuid and friends
are forwarded to the process's own Linux-side proxy thread, which then holds the new
credentials; a node proxy serving many ranks cannot hold every task's credentials, so the
task with credentials of its own leaves the offload instead.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import resource
import select
import struct
import time
from collections.abc import Callable
from functools import partial

from mckmpi.linux import check, libc
from mckmpi.offload import accounting, syscalls
from mckmpi.offload.data import DataCalls
from mckmpi.offload.kernel_abi import SYS
from mckmpi.offload.paths import PathCalls
from mckmpi.offload.policy import Policy
from mckmpi.offload.remote import ArenaMapping
from mckmpi.offload.seccomp import (
    IOCTL_NOTIF_ID_VALID,
    IOCTL_NOTIF_RECV,
    IOCTL_NOTIF_SEND,
    NOTIF,
    NOTIF_RESP,
    NOTIF_ZERO,
    USER_NOTIF_FLAG_CONTINUE,
)
from mckmpi.offload.tracee import CONTINUE, ID, Gone, task_facts

try:
    from mckmpi.offload import _fastpath
except ImportError:  # a source tree that was never installed: `serve` refuses to start
    _fastpath = None  # type: ignore[assignment]
COMPILED_MISSING = ("the proxy's compiled hot path (mckmpi/offload/_fastpath.c) is not built: "
                    "install mckmpi with `make setup` (or pip install -e .; a source tree used "
                    "through PYTHONPATH: python setup.py build_ext --inplace), which needs a C "
                    "compiler, or start the proxy with --interpreted")

_PWRITE64, _WRITE = SYS["pwrite64"], SYS["write"]
_U64 = struct.Struct("<Q")
_UNLIMITED = 0xFFFFFFFFFFFFFFFF  # RLIM_INFINITY as the kernel stores it
SMALL_WRITE = 64 << 10
#: unexpected receive failures after which a serving thread gives up (see _receive_failed)
RECEIVE_FAILURES = 100


def _nofile(pid: int) -> int:
    """The soft RLIMIT_NOFILE of process `pid` as the kernel stores it (u64; infinity max)."""
    try:
        return resource.prlimit(pid, resource.RLIMIT_NOFILE)[0] & _UNLIMITED
    except OSError:
        return _UNLIMITED  # unknown: only an unlimited limit keeps the process served


class Emulator(PathCalls, DataCalls):
    """The proxy side of one registered rank: its tracee state, the handlers, the loop."""

    def __init__(self, *, rank: int, pid: int, listener: int, fd_base: int, policy: Policy,
                 arena: ArenaMapping | None, log: Callable[[str], None]) -> None:
        super().__init__(rank=rank, pid=pid, listener=listener, fd_base=fd_base,
                         policy=policy, arena=arena, log=log)
        self.passthrough = False   # after detach: everything runs natively
        self.spin_ns = 0           # set by the server (see `serve`)
        self.compiled = _fastpath is not None  # hot calls in C (see `serve`)
        self.closing = False
        self._receive_failures = 0
        self._resp = bytearray(NOTIF_RESP.size)
        self._handlers: list[Callable[..., int] | None] = [None] * 512
        for row in syscalls.trapped():
            self._handlers[row.nr] = (partial(self._identity_change, row.name)
                                      if row.kind == "identity" else getattr(self, f"_sys_{row.name}"))

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

        With `compiled` (the default), `_fastpath.serve` receives instead and answers the
        plain hot calls (read/write/pread64/pwrite64 on a cached descriptor) in C, without
        the GIL; it returns each call it does not answer, which then takes the path below.

        The listener wakes this thread synchronously (`_sync_wake_up`) where the kernel can.
        """
        _unshare_fs()
        lfd = self.listener
        _sync_wake_up(lfd)
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
        pack_id = ID.pack_into
        add = records.add
        resp, pack_resp = self._resp, NOTIF_RESP.pack_into
        while not self.closing:
            try:
                if self.compiled:
                    self._receive_compiled(buf)
                else:
                    buf[:] = NOTIF_ZERO
                    if self.spin_ns:
                        until = now() + self.spin_ns
                        while not ready(0) and now() < until:
                            pass
                    ioctl(lfd, IOCTL_NOTIF_RECV, buf)
            except OSError as e:  # EINTR: a stop request; ENOENT: the caller died meanwhile
                if e.errno == errno.ENOENT and any(ev & hup for _, ev in ready(0)):
                    return  # no task uses the filter any more: RECV would fail at once forever
                if e.errno in (errno.EINTR, errno.ENOENT):
                    continue
                self._receive_failed(e)
                continue
            t0 = now()
            nid, tid, _, nr, _, _, a0, a1, a2, a3, a4, a5 = unpack_from(buf)
            res = None  # the call's result once the proxy executed it (see _rescue)
            try:
                if (nr == _PWRITE64 or nr == _WRITE) and not self.passthrough:
                    # Fast path for the commonest call, a small write from ordinary memory to
                    # a known descriptor: the same steps as _sys_pwrite64/_write_from, without
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
                                res = (pwrite(entry[0], view, a3) if nr == _PWRITE64
                                       else write(entry[0], view))
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
                    proc = tids.get(tid) or self._proc(nid, tid)
                    res = CONTINUE if proc.native else handler(nid, tid, a0, a1, a2, a3, a4, a5)
                except Gone:  # the caller vanished; if it did not, let the kernel run the call
                    self._continue(nid)
                    continue
                except OSError as e:
                    res = -e.errno
                except Exception as e:  # noqa: BLE001 -- a handler's bug: run it natively
                    res = CONTINUE  # (see _rescue); counted and logged like the loop's own
                    self._how |= accounting.FAILED
                    self.failures.report(syscalls.name_of(nr), e, "CONTINUE")
                # the record goes in before the answer: once answered, the rank may detach
                t1 = now()
                if res == CONTINUE:
                    records.add(t0, t1, 0, 0, tid, self._fd, 0, nr,
                                continued | (self._how & accounting.MARKS))
                    self._continue(nid)
                    continue
                if res >= 0:
                    records.add(t0, t1, res if self._moved else 0, res, tid, self._fd, 0, nr,
                                self._how)
                else:
                    records.add(t0, t1, 0, -1, tid, self._fd, -res, nr, self._how)
                self._send(nid, res, nr)
            except Exception as e:  # noqa: BLE001 -- the loop's own failure: answer, go on
                self._rescue(e, nid, tid, nr, t0, res)

    def _rescue(self, exc: Exception, nid: int, tid: int, nr: int, t0: int,
                res: int | None) -> None:
        """Answer a call the loop itself failed on (outside the handlers' own error
        handling: the record buffer, the answer, a bug), then count and log the failure.

        The answer is the call's result when the proxy had executed the call: its effects
        happened (bytes written, a descriptor installed in the caller), and running it again
        natively would repeat them. Otherwise it is CONTINUE: the kernel runs the call in
        the caller, with the caller's identity, on the caller's own descriptors (an
        offloaded descriptor is installed in the rank and shares its open file description
        with the proxy's copy), which is what the caller could do natively -- always
        correct, only not offloaded. An error reply instead would fail a call that works
        natively. A result that cannot be sent at all (a handler bug that gave something
        else than an integer) is answered with EIO: the call may have run, and EIO is the
        errno of an I/O whose outcome is unknown. If the caller is gone, the answer is
        refused with ENOENT, which is harmless.
        """
        failed = accounting.FAILED
        try:
            if res is None or res == CONTINUE:
                res, answer, how = None, "CONTINUE", accounting.CONTINUED | failed
                self._continue(nid, nr)
            else:
                answer, how = f"its result {res}", accounting.EMULATED | failed
                self._send(nid, res, nr)
        except Exception:  # noqa: BLE001 -- even the answer failed: the error that is honest
            res, answer, how = -errno.EIO, "EIO", failed
            NOTIF_RESP.pack_into(self._resp, 0, nid, 0, res, 0)
            try:
                fcntl.ioctl(self.listener, IOCTL_NOTIF_SEND, self._resp)
            except OSError:
                pass  # the caller is gone
        with contextlib.suppress(Exception):  # the record buffer itself may be what failed
            if not self.records.mark(t0, tid, failed):  # else recorded before it failed
                result, err = (0, 0) if res is None else (res, 0) if res >= 0 else (-1, -res)
                self.records.add(t0, time.monotonic_ns(), 0, result, tid, self._fd, err, nr, how)
        with contextlib.suppress(Exception):  # a log that cannot be written must not stop serving
            self.failures.report(syscalls.name_of(nr), exc, answer)

    def _receive_failed(self, exc: OSError) -> None:
        """A receive that failed for another reason than the kernel's two (EINTR, ENOENT):
        nothing was received, so nothing is owed; the failure is counted and logged (one
        kind per errno, whichever path received), the compiled receive (if that was it)
        gives way to the Python one, and the next receive comes after a pause so that a
        lasting failure cannot spin a Linux core. After
        RECEIVE_FAILURES of them the thread gives up (raises): the server then closes the
        rank's listener, and the kernel fails the rank's trapped calls with ENOSYS from then
        on, which the rank reports, instead of waiting for an answer forever."""
        self.compiled = False
        self._receive_failures += 1
        if self._receive_failures > RECEIVE_FAILURES:
            raise OSError(exc.errno, f"receiving failed {self._receive_failures} times, last: "
                          f"{exc.strerror}") from exc
        with contextlib.suppress(Exception):  # as in _rescue
            self.failures.report("receiving", exc, "nothing (no call was received)",
                                 kind=("receiving", "OSError", exc.errno or 0))
        time.sleep(0.01)

    def _identity_change(self, name: str, nid, tid, a0, a1, a2, a3, a4, a5):
        """A call that changes what the task may do with files: native from now on.

        Some limit calls change nothing the proxy relies on and stay served: reading a
        limit, an unlimited RLIMIT_FSIZE (the proxy's own), and raising (or keeping)
        RLIMIT_NOFILE, which keeps the offload range usable."""
        proc = self._proc(nid, tid)
        if name in ("setrlimit", "prlimit64"):
            which, new = (a0 & 0xFFFFFFFF, a1) if name == "setrlimit" else (a1 & 0xFFFFFFFF, a2)
            if new == 0:
                return CONTINUE
            limit = self._peek(proc, nid, new, 8)
            soft = _U64.unpack(limit)[0] if limit is not None and len(limit) == 8 else None
            if soft is not None and (
                    (which == syscalls.RLIMIT_FSIZE and soft == _UNLIMITED)
                    or (which == syscalls.RLIMIT_NOFILE and soft >= _nofile(proc.tgid))):
                return CONTINUE
        if name == "prlimit64" and (a0 & 0xFFFFFFFF) not in (0, tid, proc.tgid):
            try:  # another process under this filter gets the limit
                other = self.procs.get(task_facts(a0 & 0xFFFFFFFF)[0])
            except Gone:
                other = None
            if other is not None:
                self._go_native(other, f"task {tid} called prlimit64 on it")
        self._go_native(proc, f"it called {name}")
        return CONTINUE

    def _receive_compiled(self, buf: bytearray) -> None:
        """Receive through `_fastpath` until a call needs the handlers (left in `buf`)."""
        arena = self.arena
        consts = (self.listener, self.tids, self.records, self.rank,
                  arena.address if arena else 0, arena.end if arena else 0,
                  arena.view if arena else None, self._bounce)
        try:
            err = _fastpath.serve(self, buf, consts)
        except Exception as e:  # noqa: BLE001 -- a bug must not stop the serving: go on in Python
            self.compiled = False
            nid, tid, _, nr = NOTIF.unpack_from(buf)[:4]
            if nid:  # a call it received but did not answer: the kernel runs it
                self._rescue(e, nid, tid, nr, time.monotonic_ns(), None)
            else:  # answered with its result (zeroed id), or none received
                self.failures.report("the compiled path", e, "its result, if a call was "
                                     "received; every further call is served in Python")
            raise OSError(errno.EINTR, "compiled path stopped") from None
        if err:
            raise OSError(err, os.strerror(err))

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


_CLONE_FS = 0x200
#: SECCOMP_IOCTL_NOTIF_SET_FLAGS (_IOW('!', 4, __u64)), SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP
_IOCTL_NOTIF_SET_FLAGS, _FD_SYNC_WAKE_UP = (1 << 30) | (8 << 16) | (ord("!") << 8) | 4, 1


def _sync_wake_up(listener: int) -> None:
    """Linux >= 6.6: a trapping task wakes the serving thread on its own CPU and the answer
    wakes the task on the serving thread's, when their affinities allow it (one CPU, or both
    unpinned: then the hand-off costs no cross-CPU wake-up, measured in `mckmpi bench
    offload`); pinned to disjoint CPUs, as on a partitioned node, nothing changes. Older
    kernels refuse the flag (EINVAL) and wake as before."""
    try:
        fcntl.ioctl(listener, _IOCTL_NOTIF_SET_FLAGS, _FD_SYNC_WAKE_UP)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTTY):
            raise


def _unshare_fs() -> None:
    """Give the calling thread its own cwd and umask, so it can adopt the rank's."""
    check(libc.unshare(_CLONE_FS), "unshare(CLONE_FS)")
