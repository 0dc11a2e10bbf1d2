"""The rank's side of the offload: register with the node proxy and install the filter.

    session = attach(socket, rank=r, arena_memfd=arena.memfd, policy=Policy("io"),
                     arena_address=arena.address, on_proxy_death=abort_job)
    ...                                 # the app: its I/O now runs in the proxy
    records = session.detach()          # numpy array of accounting.RECORD_DTYPE

A seccomp filter cannot be removed, so `detach` does not unfilter the rank: it collects the
records and switches the proxy to pass-through (every trapped call is answered CONTINUE and
runs natively), which keeps e.g. the trace writer's own I/O out of the records.

If the proxy dies, the rank's trapped calls fail with ENOSYS (the kernel's answer when a
listener is gone) -- an app would see odd I/O errors or hang in retries. A watcher thread
polls the control socket for hang-up and calls `on_proxy_death(message)` at once (the
runner passes a function that aborts the MPI job); if that returns, the rank exits with
status EXIT_PROXY_DIED. The thread sleeps in poll() and costs the rank nothing until then.

`OffloadSession.channel` opens a `Channel`, the rank's end of an asynchronous request ring
(layout in `ring`).
"""

from __future__ import annotations

import gc
import mmap
import os
import resource
import select
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mckmpi import linux
from mckmpi.errors import FeatureUnavailable, error_line
from mckmpi.offload import accounting, protocol, ring, seccomp
from mckmpi.offload.errors import OffloadError
from mckmpi.offload.policy import Policy
from mckmpi.offload.spawn import wait_for_socket
from mckmpi.offload.syscalls import FD_BASE, FD_SPAN

EXIT_PROXY_DIED = 70  # EX_SOFTWARE
PR_GET_DUMPABLE = 3
_MIN_SPAN = 64


def _default_on_death(message: str) -> None:
    """Straight to descriptor 2: the process is about to _exit, nothing else will flush."""
    os.write(2, f"{error_line(message)}\n".encode())


class Channel:
    """The rank's end of an asynchronous request ring (layout and protocol: `ring`)."""

    def __init__(self, session: OffloadSession, slots: int = 64) -> None:
        if slots < 1 or slots & (slots - 1):
            raise ValueError(f"slots must be a power of two, got {slots}")
        if session.arena_address is None:
            raise OffloadError("an asynchronous channel needs the rank's arena")
        self.slots = slots
        self.arena_address = session.arena_address
        self.arena_size = session.arena_size
        self._ringfd = os.memfd_create("mckmpi-offload-ring", os.MFD_CLOEXEC)
        os.ftruncate(self._ringfd, ring.ring_size(slots))
        self._ring = mmap.mmap(self._ringfd, ring.ring_size(slots), flags=mmap.MAP_SHARED)
        ring.HDR.pack_into(self._ring, 0, 0, 0, slots, ring.MAGIC)
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
        if op in (ring.OP_WRITE, ring.OP_READ) and not (
                0 <= arena_offset and arena_offset + length <= self.arena_size):
            raise ValueError(f"[{arena_offset}, {arena_offset + length}) is outside the arena")
        while self._head - self._seen >= self.slots:
            if not self.poll():
                self._block(0.01)
        seq = self._head
        ring.REQ.pack_into(self._ring, ring.HEADER + (seq % self.slots) * ring.SLOT, seq, op, fd,
                           offset, arena_offset, length)
        self._head = seq + 1
        self._counters[0] = self._head  # publish after the slot is complete
        os.eventfd_write(self._doorbell, 1)
        if on_done is not None:
            self._callbacks[seq] = on_done
        return seq

    def write(self, fd: int, offset: int, array: np.ndarray,
              on_done: Callable[[int], Any] | None = None) -> int:
        """Queue a write of a contiguous arena array to `fd` at `offset`."""
        return self.submit(ring.OP_WRITE, fd, offset, self._arena_offset(array), array.nbytes, on_done)

    def read(self, fd: int, offset: int, array: np.ndarray,
             on_done: Callable[[int], Any] | None = None) -> int:
        """Queue a read from `fd` at `offset` into a contiguous arena array."""
        return self.submit(ring.OP_READ, fd, offset, self._arena_offset(array), array.nbytes, on_done)

    def fsync(self, fd: int, on_done: Callable[[int], Any] | None = None) -> int:
        return self.submit(ring.OP_FSYNC, fd, 0, 0, 0, on_done)

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
            at = ring.HEADER + (seq % self.slots) * ring.SLOT + ring.DONE_AT
            result = ring.DONE.unpack_from(self._ring, at)[0]
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


class OffloadSession:
    """A rank's registration with its proxy."""

    def __init__(self, *, rank: int, sock: socket.socket | None, proxy_pid: int | None,
                 fd_base: int, policy: Policy, socket_path: str,
                 arena_address: int | None, arena_size: int, zero_copy: bool) -> None:
        self.rank = rank
        self.proxy_pid = proxy_pid
        self.fd_base = fd_base
        self.policy = policy
        self.socket_path = socket_path
        self.arena_address = arena_address
        self.arena_size = arena_size
        self.zero_copy = zero_copy
        self.detached = False
        self._sock = sock
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        """False for `--offload none`: no filter, no proxy."""
        return self._sock is not None

    def lost(self, timeout: float = 0.0) -> bool:
        """Whether the proxy hung up (waiting up to `timeout` s for it): then the rank's
        trapped calls fail with ENOSYS, and the watcher is about to end the job."""
        if self._sock is None:
            return False
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLRDHUP)
        return bool(poller.poll(int(timeout * 1000)))

    def request(self, msg: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> tuple[dict[str, Any], list[int]]:
        """One request/reply with the proxy; OffloadError if it refuses."""
        if self._sock is None:
            raise OffloadError("offload is off (--offload none): there is no proxy to ask")
        with self._lock:
            try:
                protocol.send(self._sock, msg, fds)
                reply, got = protocol.recv(self._sock)
            except (OSError, protocol.ProtocolError) as e:
                raise OffloadError(f"offload proxy at {self.socket_path} did not answer: {e}") from None
        if not reply.get("ok"):
            for fd in got:
                os.close(fd)
            raise OffloadError(f"offload proxy refused {msg.get('op')}: {reply.get('error')}")
        return reply, got

    def channel(self, slots: int = 64) -> Channel:
        """An asynchronous request ring to the proxy (needs the arena)."""
        return Channel(self, slots)

    def detach(self) -> np.ndarray:
        """Records of every call offloaded so far; later calls run natively and unrecorded."""
        if self._sock is None:
            return np.zeros(0, dtype=accounting.RECORD_DTYPE)
        if self.detached:
            raise OffloadError("offload session already detached")
        records = self._fetch("detach")
        self.detached = True
        return records

    def records(self) -> np.ndarray:
        """Records of every call offloaded so far, the session staying attached (the run
        file streams them while the app runs)."""
        if self._sock is None or self.detached:
            return np.zeros(0, dtype=accounting.RECORD_DTYPE)
        return self._fetch("records")

    def _fetch(self, op: str) -> np.ndarray:
        reply, fds = self.request({"op": op})
        (memfd,) = fds
        try:
            size = reply["count"] * accounting.RECORD_DTYPE.itemsize
            raw = bytearray(size)
            view, done = memoryview(raw), 0
            while done < size:
                n = os.preadv(memfd, [view[done:]], done)
                if n == 0:
                    raise OffloadError("offload records truncated")
                done += n
        finally:
            os.close(memfd)
        return accounting.from_bytes(raw)


def _arena_mapping(memfd: int) -> tuple[int, int]:
    """(address, size) of this process's mapping of `memfd` at offset 0, from /proc/self/maps."""
    st = os.fstat(memfd)
    best: tuple[int, int] | None = None
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) < 5 or int(parts[4]) != st.st_ino or int(parts[2], 16) != 0:
                continue
            major, minor = (int(x, 16) for x in parts[3].split(":"))
            if (major, minor) != (os.major(st.st_dev), os.minor(st.st_dev)):
                continue
            start, end = (int(x, 16) for x in parts[0].split("-"))
            if best is None or end - start > best[1]:
                best = (start, min(end - start, st.st_size))
    if best is None:
        raise OffloadError("the arena memfd is not mapped in this process")
    return best


def _raise_nofile(fd_base: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    unlimited = hard == resource.RLIM_INFINITY
    if not unlimited and hard < fd_base + _MIN_SPAN:
        raise FeatureUnavailable(
            f"offloaded descriptors start at {fd_base} but the hard RLIMIT_NOFILE is {hard}: "
            f"raise it (ulimit -Hn {fd_base + FD_SPAN}) or lower the offload fd base")
    want = fd_base + FD_SPAN if unlimited else min(hard, fd_base + FD_SPAN)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _watch(sock: socket.socket, message: str, on_death: Callable[[str], None]) -> None:
    """Block until the proxy hangs up; then report and end the rank."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLRDHUP)
    while not poller.poll():
        pass
    try:
        on_death(message)
    finally:
        os._exit(EXIT_PROXY_DIED)


def attach(socket_path: str | Path, *, rank: int, arena_memfd: int | None,
           policy: Policy, arena_address: int | None = None, fd_base: int = FD_BASE,
           on_proxy_death: Callable[[str], None] | None = None,
           timeout: float = 30.0) -> OffloadSession:
    """Register this rank with the proxy at `socket_path` and install the filter.

    Call after MPI init (see `seccomp.install` for why) and after every import the app
    needs before its first offloaded call. Raises FeatureUnavailable/OffloadError (one
    clear line) if the kernel, the limits or the proxy do not allow offload; after the
    filter is installed a failure leaves the rank unable to do file I/O, so the caller must
    abort the job on any exception from here.
    """
    path = str(socket_path)
    if not policy.active:
        return OffloadSession(rank=rank, sock=None, proxy_pid=None, fd_base=fd_base,
                              policy=policy, socket_path=path, arena_address=None,
                              arena_size=0, zero_copy=False)
    if seccomp.installed():
        raise OffloadError("this process is already offloaded (a filter cannot be stacked)")
    if linux.prctl(PR_GET_DUMPABLE) != 1:
        raise OffloadError("this process is not dumpable (it changed credentials), so the proxy "
                           "cannot read its buffers: call prctl(PR_SET_DUMPABLE, 1) first")
    _raise_nofile(fd_base)
    arena = None
    if arena_memfd is not None:
        addr, size = _arena_mapping(arena_memfd)
        if arena_address is not None and arena_address != addr:
            raise OffloadError(f"arena address {arena_address:#x} is not where its memfd is "
                               f"mapped ({addr:#x})")
        arena = [addr, size]
    wait_for_socket(path, timeout)
    try:
        sock = protocol.connect(path)
    except OSError as e:
        raise OffloadError(f"cannot connect to the offload proxy at {path}: {e.strerror}") from None
    try:
        proxy_pid, uid, _ = seccomp.peer_credentials(sock)
        if uid != os.geteuid():
            raise OffloadError(f"the process listening at {path} runs as uid {uid}, not "
                               f"{os.geteuid()}: refusing to hand it this rank")
        hello = {"op": "hello", "version": protocol.VERSION, "rank": rank, "fd_base": fd_base,
                 "policy": policy.to_dict(), "arena": arena}
        protocol.send(sock, hello)
        reply, _ = protocol.recv(sock)
        if not reply.get("ok"):
            raise OffloadError(f"offload proxy refused rank {rank}: {reply.get('error')}")
        seccomp.set_ptracer(proxy_pid)
        prog = seccomp.build_filter(fd_base)
        reply = _install_and_register(sock, prog, arena_memfd)
    except BaseException:
        sock.close()
        raise
    message = (f"rank {rank}: the offload proxy (pid {proxy_pid}, {path}) died; "
               f"this rank's file I/O would fail with ENOSYS, aborting the job")
    threading.Thread(target=_watch, args=(sock, message, on_proxy_death or _default_on_death),
                     daemon=True, name="mckmpi-offload-watch").start()
    return OffloadSession(rank=rank, sock=sock, proxy_pid=proxy_pid, fd_base=fd_base,
                          policy=policy, socket_path=path,
                          arena_address=arena[0] if arena else None,
                          arena_size=arena[1] if arena else 0,
                          zero_copy=bool(reply.get("zero_copy")))


def _install_and_register(sock: socket.socket, prog: bytes,
                          arena_memfd: int | None) -> dict[str, Any]:
    """Install the filter and hand the listener over, with nothing trappable in between.

    Until the proxy holds the listener, a trapped call from this thread would wait forever,
    so the window runs with signals blocked and the garbage collector off (a finalizer or
    a handler could do file I/O), using only untrapped calls (sendmsg, recvmsg, close on
    low descriptors).
    """
    fds = [arena_memfd] if arena_memfd is not None else []
    was_enabled = gc.isenabled()
    gc.disable()
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    listener = -1
    installed = False
    try:
        listener = seccomp.install(prog, all_threads=True)
        installed = True
        protocol.send(sock, {"op": "register"}, [listener, *fds])
        os.close(listener)
        listener = -1
        reply, got = protocol.recv(sock)
    except (OSError, protocol.ProtocolError) as e:
        if not installed:
            raise OffloadError(str(e)) from None
        if listener >= 0:
            os.close(listener)
        raise OffloadError(f"offload registration failed after the filter was installed "
                           f"({e}); file I/O of this rank will fail") from None
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        if was_enabled:
            gc.enable()
    for fd in got:
        os.close(fd)
    if not reply.get("ok"):
        raise OffloadError(f"offload proxy refused the registration: {reply.get('error')}; "
                           f"file I/O of this rank will fail")
    return reply
