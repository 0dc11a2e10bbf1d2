"""The proxy's serving never dies silently: faults injected into a proxy (forked from this
process, patched before it serves) leave every rank call answered within seconds, each
failure logged once with the rank and counted in the records (`accounting.FAILED`)."""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_offload_support import Child, attach, fork, records_of, scratch

from mckmpi.lwk.arena import Arena
from mckmpi.offload import (
    accounting,
    client,
    loop,
    ring_server,
    server,
    spawn,
    syscalls,
)
from mckmpi.offload.seccomp import IOCTL_NOTIF_RECV
from mckmpi.offload.syscalls import FD_BASE

pytestmark = [pytest.mark.offload, pytest.mark.timeout(120)]

MiB = 1 << 20
OPENAT = syscalls.table()["openat"].nr
WRITE = syscalls.table()["write"].nr
ANSWER_S = 10  # every answer the rank waits for must come within this


class Injected(RuntimeError):
    """The fault a test makes the proxy raise."""


def _proxy(conn, sock: str, fault: Callable[[], None]) -> None:
    conn.close()
    fault()  # patches this forked proxy only
    os._exit(server.serve(sock, expected=1, parent_pid=os.getppid(), idle_timeout=30))


@pytest.fixture
def children() -> Iterator[list[Child]]:
    """Forked proxies and ranks: whatever a failing test left running is killed."""
    started: list[Child] = []
    yield started
    for child in started:
        if child.status is None:
            child.kill()


def _start(d: Path, fault: Callable[[], None], children: list[Child]):
    run_dir = d / "run"
    run_dir.mkdir(mode=0o700)
    path = spawn.socket_path(run_dir)
    log = d / "proxy.log"
    proxy = fork(_proxy, str(path), fault, stderr_path=str(log))
    children.append(proxy)
    spawn.wait_for_socket(path, 10)
    return proxy, path, log


def _rank(children: list[Child], fn: Callable[..., None], *args: Any) -> Child:
    child = fork(fn, *args)
    children.append(child)
    return child


def _failing_record(times: int | None, call: int) -> Callable[[], None]:
    """Records.add raises for rows of `call`, `times` times (None: always)."""
    def fault() -> None:
        real = accounting.Records.add
        left = [times]

        def add(self, trap_ns, done_ns, nbytes, result, pid, fd, err, c, how):
            if c == call and not how & accounting.FAILED and left[0] != 0:
                if left[0] is not None:
                    left[0] -= 1
                raise Injected("the record buffer is full")
            return real(self, trap_ns, done_ns, nbytes, result, pid, fd, err, c, how)

        accounting.Records.add = add
    return fault


def _opener(conn, sock: str, path: str, n: int) -> None:
    s = attach(sock)
    fds = [os.open(f"{path}.{i}", os.O_CREAT | os.O_RDWR, 0o600) for i in range(n)]
    conn.send("opened")
    for i, fd in enumerate(fds):
        os.write(fd, f"file {i}\n".encode())
        os.lseek(fd, 0, os.SEEK_SET)
    conn.send((fds, [os.read(fd, 100).decode() for fd in fds], s.detach().tobytes()))


def _log_lines(log: Path, text: str) -> list[str]:
    return [ln for ln in log.read_text().splitlines() if text in ln]


def _failing_answer() -> None:
    """The first answer to an openat raises (a bug in the answer) after its record."""
    real = loop.Emulator._send
    left = [1]

    def send(self, nid, res, nr, flags=0):
        if nr == OPENAT and left[0]:
            left[0] = 0
            raise Injected("the answer broke")
        return real(self, nid, res, nr, flags)

    loop.Emulator._send = send


@pytest.mark.parametrize("fault, reason", [
    (_failing_record(1, OPENAT), "the record buffer is full"),
    (_failing_answer, "the answer broke"),
], ids=["record", "answer"])
def test_a_failure_after_the_call_ran_answers_its_result_once(
        children: list[Child], fault: Callable[[], None], reason: str) -> None:
    """The open ran in the proxy (a descriptor installed in the rank), then its record or
    its answer failed: the rank gets that descriptor, not a second, native open, and the
    call has one record, marked failed."""
    with scratch() as d:
        proxy, sock, log = _start(d, fault, children)
        rank = _rank(children, _opener, str(sock), str(d / "f"), 1)
        assert rank.recv(ANSWER_S) == "opened"
        fds, contents, raw = rank.recv(ANSWER_S)
        assert rank.wait() == 0 and proxy.wait(10) == 0
        assert fds[0] >= FD_BASE and contents == ["file 0\n"]
        failed = _log_lines(log, "the proxy failed on")
        assert len(failed) == 1 and failed[0].startswith(f"mckmpi proxy[{proxy.pid}]: rank 0: "), \
            log.read_text()
        assert f"openat (Injected: {reason}); answered it with its result {fds[0]}" in failed[0]
    rec = records_of(raw)
    opens = rec[rec["call"] == OPENAT]
    assert len(opens) == 1 and opens["result"][0] == fds[0]
    assert opens["how"][0] & (accounting.FAILED | accounting.EMULATED) \
        == accounting.FAILED | accounting.EMULATED


def test_a_lasting_failure_is_logged_once_counted_per_call_and_every_call_answered(
        children: list[Child]) -> None:
    with scratch() as d:
        proxy, sock, log = _start(d, _failing_record(None, OPENAT), children)
        rank = _rank(children, _opener, str(sock), str(d / "f"), 40)
        assert rank.recv(ANSWER_S) == "opened"
        fds, contents, raw = rank.recv(ANSWER_S)
        assert rank.wait() == 0 and proxy.wait(10) == 0
        assert contents == [f"file {i}\n" for i in range(40)]
        assert len(_log_lines(log, "the proxy failed on openat")) == 1, log.read_text()
        assert len(_log_lines(log, "rank 0: the proxy failed on 40 calls in all")) == 1, \
            log.read_text()
    rec = records_of(raw)
    failed = rec[(rec["how"] & accounting.FAILED) != 0]
    assert len(failed) == 40 and set(failed["call"]) == {OPENAT}
    assert sorted(failed["result"]) == sorted(fds)


def _mkdir_handlers_fail() -> None:
    def broken(self, *args):
        raise Injected("a handler bug")

    for name in ("_sys_mkdir", "_sys_mkdirat"):
        if hasattr(loop.Emulator, name):
            setattr(loop.Emulator, name, broken)


def test_a_handler_that_fails_lets_the_kernel_run_the_call(children: list[Child]) -> None:
    def rank_fn(conn, sock, path):
        s = attach(sock)
        os.mkdir(f"{path}.1")
        os.mkdir(f"{path}.2")
        try:
            os.mkdir(f"{path}.2")
            again = "made"
        except OSError as e:
            again = errno.errorcode[e.errno]
        conn.send((again, s.detach().tobytes()))

    with scratch() as d:
        proxy, sock, log = _start(d, _mkdir_handlers_fail, children)
        rank = _rank(children, rank_fn, str(sock), str(d / "dir"))
        again, raw = rank.recv(ANSWER_S)
        assert rank.wait() == 0 and proxy.wait(10) == 0
        assert again == "EEXIST" and (d / "dir.1").is_dir() and (d / "dir.2").is_dir()
        failed = _log_lines(log, "the proxy failed on mkdir")
        assert len(failed) == 1 and "(Injected: a handler bug); answered it with CONTINUE" \
            in failed[0], log.read_text()
        assert len(_log_lines(log, "rank 0: the proxy failed on 3 calls in all")) == 1
    rec = records_of(raw)
    mkdirs = rec[np.isin(rec["call"], [syscalls.table()[n].nr for n in ("mkdir", "mkdirat")
                                       if n in syscalls.table()])]
    assert len(mkdirs) == 3
    assert all(h & (accounting.FAILED | accounting.CONTINUED)
               == accounting.FAILED | accounting.CONTINUED for h in mkdirs["how"])


class _ReceiveThenFail:
    """The compiled path as if it failed after receiving a call: it takes the next
    notification off the listener and raises, leaving the call unanswered in `buf`."""

    def __init__(self, real) -> None:
        self.real = real
        self.armed = False

    def serve(self, emulator, buf, consts):
        if not self.armed:
            return self.real.serve(emulator, buf, consts)
        self.armed = False
        buf[:] = bytes(len(buf))
        fcntl.ioctl(consts[0], IOCTL_NOTIF_RECV, buf)
        raise Injected("a bug in the compiled path")


def _fail_compiled_at_first_write() -> None:
    flaky = _ReceiveThenFail(loop._fastpath)
    real_open = loop.Emulator._sys_openat

    def openat(self, *args):  # arm once the rank's file is open: its write is next
        fd = real_open(self, *args)
        flaky.armed = True
        return fd

    loop.Emulator._sys_openat = openat
    loop._fastpath = flaky


def test_a_call_received_but_not_executed_runs_natively(children: list[Child]) -> None:
    """The failure came before the proxy did the write: CONTINUE, and the kernel writes the
    same bytes through the rank's own descriptor (same open file description)."""
    def rank_fn(conn, sock, path):
        s = attach(sock)
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
        n = os.write(fd, b"written once\n")
        m = os.write(fd, b"and again\n")
        conn.send((fd, n, m, os.pread(fd, 100, 0), s.detach().tobytes()))

    with scratch() as d:
        proxy, sock, log = _start(d, _fail_compiled_at_first_write, children)
        rank = _rank(children, rank_fn, str(sock), str(d / "f"))
        fd, n, m, back, raw = rank.recv(ANSWER_S)
        assert rank.wait() == 0 and proxy.wait(10) == 0
        assert (d / "f").read_bytes() == b"written once\nand again\n"
        failed = _log_lines(log, "the proxy failed on")
        assert len(failed) == 1 and "rank 0: the proxy failed on write (Injected: a bug in the " \
            "compiled path); answered it with CONTINUE" in failed[0], log.read_text()
    assert fd >= FD_BASE and (n, m) == (13, 10) and back == b"written once\nand again\n"
    rec = records_of(raw)
    writes = rec[rec["call"] == WRITE]
    assert [int(h) & (accounting.FAILED | accounting.CONTINUED | accounting.EMULATED)
            for h in writes["how"]] == [accounting.FAILED | accounting.CONTINUED,
                                        accounting.EMULATED]


def _receive_fails(times: int | None) -> Callable[[], None]:
    """The receive fails with EINVAL `times` times (None: always): once in the compiled
    path, then in the Python one, which takes over."""
    def fault() -> None:
        left = [times]
        real_ioctl = fcntl.ioctl

        class CompiledFails:
            def serve(self, emulator, buf, consts):
                left[0] = left[0] - 1 if left[0] else left[0]
                return errno.EINVAL

        def ioctl(fd, request, *args):
            if request == IOCTL_NOTIF_RECV and left[0] != 0:
                if left[0] is not None:
                    left[0] -= 1
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
            return real_ioctl(fd, request, *args)

        loop._fastpath = CompiledFails()
        fcntl.ioctl = ioctl
    return fault


def test_a_receive_that_fails_a_few_times_is_retried_and_logged_once(
        children: list[Child]) -> None:
    with scratch() as d:
        proxy, sock, log = _start(d, _receive_fails(3), children)
        rank = _rank(children, _opener, str(sock), str(d / "f"), 2)
        assert rank.recv(ANSWER_S) == "opened"
        _, contents, _ = rank.recv(ANSWER_S)
        assert rank.wait() == 0 and proxy.wait(10) == 0
        assert contents == ["file 0\n", "file 1\n"]
        failed = _log_lines(log, "the proxy failed on receiving")
        assert len(failed) == 1 and failed[0].startswith(f"mckmpi proxy[{proxy.pid}]: rank 0: "), \
            log.read_text()
        assert "answered it with nothing (no call was received)" in failed[0]


def _open_until_told(conn, sock, path):
    """A rank that opens one file, says how that went and waits to be told its proxy is
    lost (its watcher then ends the process)."""
    attach(sock, on_proxy_death=lambda message: conn.send(("told", message)))
    try:
        os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
        conn.send(("open", "succeeded"))
    except OSError as e:
        conn.send(("open", errno.errorcode[e.errno]))
    time.sleep(60)


def test_a_receive_that_always_fails_ends_the_rank_instead_of_hanging(
        children: list[Child]) -> None:
    """After loop.RECEIVE_FAILURES the serving thread gives up; the server closes the
    listener and the connection, and the rank is told (as if its proxy died)."""
    with scratch() as d:
        proxy, sock, log = _start(d, _receive_fails(None), children)
        rank = _rank(children, _open_until_told, str(sock), str(d / "f"))
        heard = _until_told(rank)
        assert rank.wait(ANSWER_S) == client.EXIT_PROXY_DIED
        assert proxy.wait(10) == 0
        assert heard.get("open", "ENOSYS") == "ENOSYS", heard
        text = log.read_text()
        assert len(_log_lines(log, "the proxy failed on receiving")) == 1, text
        assert len(_log_lines(log, "rank 0: its serving thread failed")) == 1, text
        assert f"receiving failed {loop.RECEIVE_FAILURES + 1} times" in text


def _until_told(rank: Child) -> dict[str, str]:
    """What the rank sent until its watcher said the proxy is lost (within ANSWER_S)."""
    deadline = time.monotonic() + ANSWER_S
    heard: dict[str, str] = {}
    while "told" not in heard:
        kind, what = rank.recv(max(deadline - time.monotonic(), 0.01))
        heard[kind] = what
    return heard


def _fail_one_channel_request() -> None:
    real = ring_server.ChannelServer._execute
    left = [1]

    def execute(self, seq, dups):
        if left[0]:
            left[0] = 0
            raise Injected("a channel bug")
        return real(self, seq, dups)

    ring_server.ChannelServer._execute = execute


def test_a_channel_request_the_proxy_failed_on_completes_with_eio(children: list[Child]) -> None:
    def rank_fn(conn, sock, path):
        arena = Arena(4 * MiB, hugepages="never", lock="never")
        s = attach(sock, arena_memfd=arena.memfd, arena_address=arena.address)
        ch = s.channel(slots=4)
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
        a, b = arena.full(1024, 1.0), arena.full(1024, 2.0)
        first = ch.write(fd, 0, a)
        ch.wait(first, timeout=ANSWER_S)
        second = ch.write(fd, 0, b)
        ch.wait(second, timeout=ANSWER_S)
        conn.send((ch.result(first), ch.result(second), s.detach().tobytes()))
        ch.close()

    with scratch() as d:
        proxy, sock, log = _start(d, _fail_one_channel_request, children)
        rank = _rank(children, rank_fn, str(sock), str(d / "ckpt"))
        first, second, raw = rank.recv(ANSWER_S)
        assert rank.wait() == 0 and proxy.wait(10) == 0
        assert (np.fromfile(d / "ckpt") == 2.0).all()
        failed = _log_lines(log, "the proxy failed on")
        assert len(failed) == 1 and "rank 0: the proxy failed on a channel request " \
            "(Injected: a channel bug); answered it with EIO" in failed[0], log.read_text()
    assert (first, second) == (-errno.EIO, 8192)
    rec = records_of(raw)
    failed_rows = rec[(rec["how"] & accounting.FAILED) != 0]
    assert len(failed_rows) == 1 and failed_rows["errno"][0] == errno.EIO


def _doorbell_fails_once() -> None:
    real = os.eventfd_read
    left = [1]

    def eventfd_read(fd):
        value = real(fd)
        if left[0]:
            left[0] = 0
            raise OSError(errno.EIO, "the doorbell broke")
        return value

    os.eventfd_read = eventfd_read


def test_a_channel_that_fails_between_requests_still_completes_them(
        children: list[Child]) -> None:
    """The doorbell read fails after the rank rang: the thread looks at the ring anyway."""
    def rank_fn(conn, sock, path):
        arena = Arena(4 * MiB, hugepages="never", lock="never")
        s = attach(sock, arena_memfd=arena.memfd, arena_address=arena.address)
        ch = s.channel(slots=4)
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
        ticket = ch.write(fd, 0, arena.full(1024, 3.0))
        ch.wait(ticket, timeout=ANSWER_S)
        conn.send(ch.result(ticket))
        ch.close()
        s.detach()

    with scratch() as d:
        proxy, sock, log = _start(d, _doorbell_fails_once, children)
        rank = _rank(children, rank_fn, str(sock), str(d / "ckpt"))
        assert rank.recv(ANSWER_S) == 8192
        assert rank.wait() == 0 and proxy.wait(10) == 0
        assert (np.fromfile(d / "ckpt") == 3.0).all()
        failed = _log_lines(log, "the proxy failed on the channel")
        assert len(failed) == 1 and "rank 0:" in failed[0] and "the doorbell broke" in failed[0], \
            log.read_text()


def _serving_thread_dies() -> None:
    def serve(self):
        raise Injected("the serving thread broke")

    loop.Emulator.serve = serve


def test_a_rank_whose_serving_thread_died_is_told_and_ends_instead_of_hanging(
        children: list[Child]) -> None:
    """The last line of defence: a serving thread that ends anyway makes the server close
    the rank's listener and its connection, so the kernel answers the rank's calls (ENOSYS)
    and the rank's watcher reports the lost proxy and ends the rank (EXIT_PROXY_DIED), as
    when the proxy dies."""
    with scratch() as d:
        proxy, sock, log = _start(d, _serving_thread_dies, children)
        rank = _rank(children, _open_until_told, str(sock), str(d / "f"))
        heard = _until_told(rank)
        assert rank.wait(ANSWER_S) == client.EXIT_PROXY_DIED
        assert proxy.wait(10) == 0
        assert heard.get("open", "ENOSYS") == "ENOSYS", heard
        assert "the offload proxy" in heard["told"]
        assert len(_log_lines(log, "rank 0: its serving thread failed")) == 1, log.read_text()
        assert "Injected: the serving thread broke" in log.read_text()
