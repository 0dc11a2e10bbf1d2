"""The node proxy: a Linux-side process that executes the I/O system calls of its ranks.

One proxy per (virtual) node, started by the node's local rank 0 with
`spawn.start_node_proxy`, which runs `mckmpi proxy --socket PATH ...` (the command a user
runs to start one by hand); that command calls `serve`.

Threads: the main thread owns the Unix socket (registration, detach, channels) and the
lifetimes; every registered rank gets one serving thread that blocks in
SECCOMP_IOCTL_NOTIF_RECV on the rank's listener. A thread per rank rather than one epoll
loop because (1) RECV has no non-blocking mode, so an epoll loop pays an extra epoll_wait
per call, and (2) a call can block in the kernel for long (fsync, a slow disk): a single
loop would stall every rank of the node behind one rank's fsync. The hot calls (small and
bulk reads and writes on open descriptors) are received and answered by compiled code
(`_fastpath`) that holds the GIL only to look the descriptor up and append the record, so
serving threads on several Linux cores run in parallel; every other call goes through the
Python handlers, which release the GIL in each system call.

Lifetime: a rank is gone when its listener reports POLLHUP -- the rank and everything it
forked have exited (its control connection may close earlier, e.g. at execve). The proxy
exits when no rank is left and (a) the expected number of ranks has registered, (b) the
process that started it has died, or (c) no rank registered within the idle timeout since
the proxy started or since its last rank left (a job that died half-way). It does
not use PR_SET_PDEATHSIG: the spawning rank may legitimately exit while its node-mates still
close files through the proxy, and a death signal would turn that into ENOSYS failures;
watching the spawner's pidfd plus the listeners' POLLHUP gives "no orphan" without that.
"""

from __future__ import annotations

import fcntl
import gc
import os
import resource
import select
import signal
import socket
import stat
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mckmpi.offload import accounting, loop, protocol
from mckmpi.offload.errors import OffloadError
from mckmpi.offload.loop import Emulator
from mckmpi.offload.policy import Policy
from mckmpi.offload.remote import ArenaMapping
from mckmpi.offload.ring_server import ChannelServer
from mckmpi.offload.seccomp import peer_credentials, peer_groups, pidfd_open
from mckmpi.offload.syscalls import FD_LIMIT
from mckmpi.offload.tracee import Gone

#: How long a terminated proxy keeps serving the ranks it told to go.
TERM_GRACE_S = 5.0


@dataclass
class _Conn:
    sock: socket.socket
    pid: int
    hello: dict[str, Any] | None = None
    emulator: Emulator | None = None


@dataclass
class _Served:
    """A registered rank: its emulator, serving thread and channels."""

    emulator: Emulator
    thread: threading.Thread
    detached: bool = False
    channels: list[ChannelServer] = field(default_factory=list)

    def records(self) -> bytes:
        """Every row of the rank (trapped calls and channel requests) in time order."""
        return accounting.merged(self.emulator.records, *(c.records for c in self.channels))


class Server:
    """The proxy's main loop (see the module docstring)."""

    def __init__(self, path: str, *, expected: int | None, parent_pid: int | None,
                 records_dir: str | None, idle_timeout: float, remove_dir: bool,
                 spin_us: float = 0.0, compiled: bool = True) -> None:
        self.path = path
        self.compiled = compiled
        self.spin_ns = int(spin_us * 1000)
        self.expected = expected
        self.records_dir = records_dir
        self.idle_timeout = idle_timeout
        self.remove_dir = remove_dir
        self.idle_since = time.monotonic()  # since when no rank is served
        self.registered = 0
        self.parent_gone = False
        self.term_asked = 0  # the SIGTERM or SIGINT that came
        self.terminating: float | None = None  # since when the proxy ends in order
        self.ep = select.epoll()
        self.wakeup_fd, self.wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.wakeup_w, warn_on_full_buffer=False)
        self.ep.register(self.wakeup_fd, select.EPOLLIN)
        self.conns: dict[int, _Conn] = {}
        self.served: dict[int, _Served] = {}   # by listener fd
        self.sock = protocol.listening_socket(path)
        self.ep.register(self.sock.fileno(), select.EPOLLIN)
        self.parent_fd = -1
        if parent_pid:
            try:
                self.parent_fd = pidfd_open(parent_pid)
                self.ep.register(self.parent_fd, select.EPOLLIN)
            except OSError:
                self.parent_gone = True

    def log(self, msg: str) -> None:
        print(f"mckmpi proxy[{os.getpid()}]: {msg}", file=sys.stderr, flush=True)

    # --- main loop -----------------------------------------------------------------------

    def run(self) -> int:
        # The cyclic collector stays off on the serving threads' hot path (it would pause a
        # rank's call at random); the main loop collects once per idle second instead.
        gc.disable()
        try:
            while not self._finished():
                events = self.ep.poll(1.0)
                for fd, mask in events:
                    self._event(fd, mask)
                self._reap()
                if self.term_asked and self.terminating is None:
                    self.terminate()
                if not events:
                    gc.collect()
        finally:
            self.shutdown()
        # ended by a signal, even in order: the status says so, as the default action would
        return 128 + self.term_asked if self.terminating is not None else 0

    def signalled(self, signum: int) -> None:
        """SIGTERM/SIGINT: the main loop ends in order (`terminate`); asked twice: now."""
        if self.term_asked:
            raise SystemExit(128 + signum)
        self.term_asked = signum

    def terminate(self) -> None:
        """End in order after SIGTERM/SIGINT. The socket goes at once; the control
        connections close, so every rank's watcher aborts its job with one line; the
        ranks' calls are still served while they go (a proxy that vanished under them
        would turn their next call into ENOSYS), for at most TERM_GRACE_S."""
        self.terminating = time.monotonic()
        self._unlink()
        for conn in list(self.conns.values()):
            self._drop(conn)

    def _finished(self) -> bool:
        if self.terminating is not None:
            return not self.served or time.monotonic() - self.terminating > TERM_GRACE_S
        if self.served:
            return False
        if self.parent_gone:
            return True
        if self.registered and (self.expected is None or self.registered >= self.expected):
            return True
        if time.monotonic() - self.idle_since > self.idle_timeout:
            self.log(f"no rank registered within {self.idle_timeout:g} s"
                     + (f" (of {self.expected} expected, {self.registered} came)"
                        if self.registered else "") + "; exiting")
            return True
        return False

    def _event(self, fd: int, events: int) -> None:
        if fd == self.sock.fileno():
            self._accept()
        elif fd == self.parent_fd:
            self.parent_gone = True
            self.ep.unregister(fd)
        elif fd in self.served:
            self._rank_gone(fd)
        elif fd in self.conns:
            self._message(self.conns[fd])
        elif fd == self.wakeup_fd:
            os.read(fd, 512)  # a signal woke the loop: `run` acts on it

    def _accept(self) -> None:
        try:
            sock, _ = self.sock.accept()
        except OSError:
            return
        if self.terminating is not None:
            sock.close()
            return
        pid, uid, gid = peer_credentials(sock)
        peer = peer_groups(sock)
        groups = sorted(peer) if peer is not None else "more than 256"
        if uid != os.geteuid() or gid != os.getegid() or groups != sorted(os.getgroups()):
            self.log(f"refused a connection from pid {pid} (uid {uid}, gid {gid}, groups "
                     f"{groups}): this proxy acts as uid {os.geteuid()} gid {os.getegid()} "
                     f"groups {sorted(os.getgroups())} only")
            try:
                protocol.send(sock, {"ok": False, "error": "refused: the proxy serves another user"})
            except OSError:
                pass
            sock.close()
            return
        self.conns[sock.fileno()] = _Conn(sock, pid)
        self.ep.register(sock.fileno(), select.EPOLLIN)

    def _drop(self, conn: _Conn) -> None:
        self.ep.unregister(conn.sock.fileno())
        del self.conns[conn.sock.fileno()]
        conn.sock.close()

    def _message(self, conn: _Conn) -> None:
        try:
            msg, fds = protocol.recv(conn.sock)
        except (protocol.ProtocolError, OSError):
            self._drop(conn)  # the rank exited or exec'd; its listener keeps it served
            return
        try:
            reply, out_fds = self._handle(conn, msg, fds)
        except (OffloadError, OSError) as e:  # one rank's bad request never ends the proxy
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            why = str(e) if isinstance(e, OffloadError) else f"{e.strerror} ({e.filename or op_of(msg)})"
            self.log(f"rank at pid {conn.pid}: {why}")
            reply, out_fds = {"ok": False, "error": why}, []
        try:
            protocol.send(conn.sock, reply, out_fds)
        except OSError:
            self._drop(conn)
        finally:
            for fd in out_fds:
                os.close(fd)

    def _handle(self, conn: _Conn, msg: dict[str, Any], fds: list[int]) -> tuple[dict[str, Any], list[int]]:
        op = msg.get("op")
        if op == "hello":
            if fds:
                raise OffloadError("hello carries no descriptors")
            conn.hello = _check_hello(msg)
            return {"ok": True, "pid": os.getpid()}, []
        if op == "register":
            if conn.hello is None or conn.emulator is not None:
                raise OffloadError("register out of order")
            return self._register(conn, fds), []
        served = self._served_of(conn)
        if op == "channel":
            if len(fds) != 3:
                raise OffloadError("channel needs ring, doorbell and completion descriptors")
            ch = ChannelServer(served.emulator, *fds, log=self.log)
            served.channels.append(ch)
            return {"ok": True}, []
        if op in ("detach", "records"):
            if op == "detach":
                served.emulator.passthrough = True
                served.detached = True
            data = served.records()  # whole rows, also while the serving thread appends
            memfd = os.memfd_create("mckmpi-offload-records", os.MFD_CLOEXEC)
            view = memoryview(data)
            while view:
                view = view[os.write(memfd, view):]
            return {"ok": True, "count": len(data) // accounting.RECORD_DTYPE.itemsize}, [memfd]
        raise OffloadError(f"unknown request {op!r}")

    def _served_of(self, conn: _Conn) -> _Served:
        for s in self.served.values():
            if s.emulator is conn.emulator and conn.emulator is not None:
                return s
        raise OffloadError("not registered")

    def _register(self, conn: _Conn, fds: list[int]) -> dict[str, Any]:
        hello = conn.hello
        assert hello is not None
        want = 2 if hello["arena"] else 1
        if len(fds) != want:
            raise OffloadError(f"register needs {want} descriptors, got {len(fds)}")
        listener = fds[0]
        if os.readlink(f"/proc/self/fd/{listener}") != "anon_inode:seccomp notify":
            raise OffloadError("the first descriptor is not a seccomp listener")
        arena = None
        if hello["arena"]:
            address, size = hello["arena"]
            arena = _map_arena(fds[1], address, size)
            os.close(fds[1])
        try:
            emu = Emulator(rank=hello["rank"], pid=conn.pid, listener=listener,
                           fd_base=hello["fd_base"], policy=Policy.from_dict(hello["policy"]),
                           arena=arena, log=self.log)
        except (OSError, Gone) as e:
            if arena is not None:
                arena.close()
            why = e.strerror if isinstance(e, OSError) else str(e)
            raise OffloadError(f"cannot reach the memory of pid {conn.pid} ({why}): "
                               f"did it exit, or is it non-dumpable?") from None
        emu.compiled = self.compiled
        thread = threading.Thread(target=self._serve, args=(emu,), daemon=True,
                                  name=f"rank{emu.rank}")
        self.served[listener] = _Served(emu, thread)
        conn.emulator = emu
        self.ep.register(listener, 0)  # POLLHUP only: the rank and its children are gone
        self.registered += 1
        self._set_spin()
        thread.start()
        if self.expected is not None and self.registered >= self.expected:
            self._unlink()  # nobody else will come: nothing is left for a SIGKILL to strand
        return {"ok": True, "zero_copy": arena is not None}

    def _set_spin(self) -> None:
        """Spin only while every serving thread has a CPU of its own that no rank uses:
        spinning on a rank's CPU would delay the very rank it waits for."""
        mine = os.sched_getaffinity(0)
        spin = self.spin_ns if len(self.served) <= len(mine) else 0
        for served in self.served.values():
            try:
                if os.sched_getaffinity(served.emulator.pid) & mine:
                    spin = 0
            except OSError:
                pass  # the rank is exiting
        for served in self.served.values():
            served.emulator.spin_ns = spin

    def _serve(self, emu: Emulator) -> None:
        """A rank's serving thread. `Emulator.serve` answers every call it receives and
        survives its own failures; should it still end while the rank is served, the main
        loop hears of it at once (`_reap`) and closes the rank's listener, so the rank's
        calls fail with ENOSYS (and the rank reports it) rather than wait forever."""
        try:
            emu.serve()
        except BaseException:  # noqa: BLE001 -- said here once; _reap releases the rank
            if not emu.closing:
                self.log(f"rank {emu.rank}: its serving thread failed; its calls fail with "
                         f"ENOSYS from now on:\n{traceback.format_exc().rstrip()}")
        finally:
            try:
                os.write(self.wakeup_w, b"\0")  # wake the main loop: _reap
            except OSError:
                pass  # full (the loop is awake anyway) or closed at shutdown

    def _reap(self) -> None:
        """Release every rank whose serving thread ended: its tasks are gone (the thread saw
        the listener hang up) or the thread failed (see `_serve`)."""
        for listener, served in list(self.served.items()):
            if not served.thread.is_alive():
                self._rank_gone(listener)

    def _rank_gone(self, listener: int) -> None:
        served = self.served.pop(listener)
        self.idle_since = time.monotonic()
        self.ep.unregister(listener)
        self._set_spin()
        for conn in list(self.conns.values()):
            if conn.emulator is served.emulator:
                self._drop(conn)
        self._stop(served)
        emu = served.emulator
        summary = emu.failures.summary()
        if summary:
            self.log(summary)
        if not served.detached and self.records_dir:
            path = Path(self.records_dir) / f"offload-rank{emu.rank}-pid{emu.pid}.npy"
            try:
                np.save(path, accounting.from_bytes(served.records()))
            except OSError as e:
                self.log(f"rank {emu.rank}: cannot save its offload records to {path}: {e}")
        emu.release()

    def _stop(self, served: _Served) -> None:
        for ch in served.channels:
            ch.stop()
        served.emulator.closing = True
        deadline = time.monotonic() + 5
        while served.thread.is_alive() and time.monotonic() < deadline:
            try:
                signal.pthread_kill(served.thread.ident, signal.SIGUSR1)  # interrupts RECV
            except ProcessLookupError:
                break
            served.thread.join(0.05)
        if served.thread.is_alive():
            self.log(f"rank {served.emulator.rank}: serving thread did not stop")

    def shutdown(self) -> None:
        for listener in list(self.served):
            served = self.served.pop(listener)
            self._stop(served)
            served.emulator.release()
        for conn in list(self.conns.values()):
            conn.sock.close()
        self.conns.clear()
        self._unlink()
        if self.parent_fd >= 0:
            os.close(self.parent_fd)
        self.ep.close()


    def _unlink(self) -> None:
        """Remove the socket (and its directory when the proxy created it) and stop
        listening; connected ranks keep their connections."""
        if self.sock.fileno() >= 0:
            self.ep.unregister(self.sock.fileno())
            self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        if self.remove_dir:
            try:
                os.rmdir(os.path.dirname(self.path))
            except OSError:
                pass


def op_of(msg: dict[str, Any]) -> str:
    return str(msg.get("op"))


def _check_hello(msg: dict[str, Any]) -> dict[str, Any]:
    try:
        rank = int(msg["rank"])
        fd_base = int(msg["fd_base"])
        policy = Policy.from_dict(msg["policy"])
        arena = msg["arena"]
        if arena is not None:
            arena = [int(arena[0]), int(arena[1])]
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise OffloadError(f"malformed hello: {e!r}") from None
    if msg.get("version") != protocol.VERSION:
        raise OffloadError(f"protocol version {msg.get('version')} != {protocol.VERSION}")
    if not 3 <= fd_base < FD_LIMIT:
        raise OffloadError(f"fd_base {fd_base} out of range")
    return {"rank": rank, "fd_base": fd_base, "policy": policy.to_dict(), "arena": arena}


def _map_arena(memfd: int, address: int, size: int) -> ArenaMapping:
    """Map a rank's arena; it must be a memfd sealed (or sealable) against shrinking."""
    st = os.fstat(memfd)
    if not stat.S_ISREG(st.st_mode) or st.st_size < size or size <= 0:
        raise OffloadError(f"arena memfd of {st.st_size} bytes cannot back {size} bytes")
    try:
        seals = fcntl.fcntl(memfd, fcntl.F_GET_SEALS)
    except OSError:
        seals = 0
    if not seals & fcntl.F_SEAL_SHRINK:
        try:
            fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        except OSError as e:
            raise OffloadError(
                "the arena memfd cannot be sealed against shrinking (create it with "
                f"MFD_ALLOW_SEALING): {e.strerror}") from None
    return ArenaMapping(memfd, address, size)


# --- running it ------------------------------------------------------------------------------


def serve(socket_path: str | Path, *, cpus: list[int] | None = None, expected: int | None = None,
          parent_pid: int | None = None, records_dir: str | Path | None = None,
          idle_timeout: float = 60.0, remove_dir: bool = False, spin_us: float = 0.0,
          compiled: bool = True) -> int:
    """Run a proxy in this process until its ranks are gone; returns the exit status.

    `spin_us`: after each call a serving thread polls that long for the next one before it
    sleeps (only while the proxy has a CPU per rank); see `Emulator.serve`. `compiled`:
    answer the hot calls in C (`_fastpath`); False serves every call in Python.
    """
    if compiled and loop._fastpath is None:
        raise OffloadError(loop.COMPILED_MISSING)
    directory = Path(socket_path).parent
    if not directory.is_dir():
        raise OffloadError(f"the proxy socket's directory {directory} does not exist")
    st = directory.stat()
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise OffloadError(f"the proxy socket's directory {directory} must be private "
                           f"(owned by uid {os.geteuid()}, mode 0700)")
    if cpus:
        # every thread, also those libraries started at import (OpenBLAS): one left free to
        # run on an LWK core is woken there, and preempts the rank with a reschedule IPI
        for tid in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(tid), cpus)
            except OSError:
                pass  # a thread that ended meanwhile
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    os.umask(0o077)  # the serving threads set each rank's umask on their own fs_struct

    server = Server(str(socket_path), expected=expected, parent_pid=parent_pid,
                    records_dir=str(records_dir) if records_dir else None,
                    idle_timeout=idle_timeout, remove_dir=remove_dir, spin_us=spin_us,
                    compiled=compiled)
    signal.signal(signal.SIGTERM, lambda signum, _: server.signalled(signum))
    signal.signal(signal.SIGINT, lambda signum, _: server.signalled(signum))
    signal.signal(signal.SIGUSR1, lambda *_: None)
    return server.run()
