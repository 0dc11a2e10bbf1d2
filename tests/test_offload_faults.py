"""Faults and lifetimes: dying ranks, a dying proxy, strangers, signals, leftovers."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
from test_offload_support import NOBODY, attach, fork, nobody_proxy, proxy_fds, scratch

from mckmpi.offload import client, protocol, spawn
from mckmpi.offload.errors import OffloadError
from mckmpi.offload.syscalls import FD_BASE

pytestmark = pytest.mark.offload

MiB = 1 << 20


def _memfds_named(prefix: str) -> list[str]:
    """Every descriptor on the system that is a memfd of ours (there must be none left)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith(f"/memfd:{prefix}"):
                    found.append(f"{pid}:{fd}:{target}")
        except OSError:
            continue
    return found


def test_sigkill_mid_call_frees_the_rank_and_the_proxy_serves_others():
    def victim(conn, sock, path):
        attach(sock, rank=0)
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
        big = b"v" * (32 * MiB)
        conn.send("writing")
        while True:  # nearly all of this time is spent inside the proxy
            os.pwrite(fd, big, 0)

    def survivor(conn, sock, path):
        s = attach(sock, rank=1)
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
        while (msg := conn.recv()) != "stop":
            os.pwrite(fd, msg.encode(), 0)
            conn.send(os.pread(fd, len(msg), 0).decode())
        conn.send(len(s.detach()))

    with scratch() as d:
        h = spawn.start_node_proxy(d / "run", [], expected=2)
        ok = fork(survivor, str(h.socket_path), str(d / "s"))
        assert ok.call("before") == "before"
        # once both expected ranks came, the proxy stops listening: one descriptor fewer
        fds_with_one = proxy_fds(h.pid) - 1
        v = fork(victim, str(h.socket_path), str(d / "v"))
        assert v.recv() == "writing"
        time.sleep(0.3)
        assert proxy_fds(h.pid) > fds_with_one
        v.kill()
        assert v.status == -signal.SIGKILL
        deadline = time.monotonic() + 5
        while proxy_fds(h.pid) > fds_with_one and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proxy_fds(h.pid) == fds_with_one  # the victim's state is released
        assert ok.call("after") == "after"
        ok.send("stop")
        assert ok.recv() > 0
        assert ok.wait() == 0
        assert h.wait(10) == 0


def test_a_dead_proxy_makes_the_rank_fail_fast_with_a_clear_message(tmp_path: Path):
    def rank(conn, sock, path):
        attach(sock)
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
        conn.send("looping")
        while True:
            try:
                os.pwrite(fd, b"x", 0)
            except OSError:
                pass  # ENOSYS once the listener is gone: the watcher must end us anyway

    err = tmp_path / "rank.err"
    with scratch() as d:
        h = spawn.start_node_proxy(d / "run", [], expected=1)
        child = fork(rank, str(h.socket_path), str(d / "f"), stderr_path=str(err))
        assert child.recv() == "looping"
        os.kill(h.pid, signal.SIGKILL)
        t0 = time.monotonic()
        status = child.wait(10)
        elapsed = time.monotonic() - t0
        h.wait(5)
    assert status == client.EXIT_PROXY_DIED
    assert elapsed < 5, elapsed
    text = err.read_text()
    assert "offload proxy" in text and "died" in text and "aborting" in text, text


def test_the_failure_hook_is_called_with_the_message():
    def rank(conn, sock):
        attach(sock, on_proxy_death=conn.send)  # e.g. the runner's MPI Abort
        conn.send("attached")
        time.sleep(10)  # the hook returns: the watcher ends the rank itself

    with scratch() as d:
        h = spawn.start_node_proxy(d / "run", [], expected=1)
        child = fork(rank, str(h.socket_path))
        assert child.recv() == "attached"
        h.terminate()
        assert "died" in child.recv()
        assert child.wait(10) == client.EXIT_PROXY_DIED
        h.wait(5)


def test_a_process_of_another_uid_is_refused_and_logged():
    with scratch(owner=NOBODY) as d:
        log = d / "proxy.log"
        px, sock = nobody_proxy(d / "run", 1, log)
        # root can reach the socket despite the 0700 directory: SO_PEERCRED stops it
        s = protocol.connect(str(sock))
        reply, _ = protocol.recv(s)
        s.close()
        assert reply["ok"] is False and "refused" in reply["error"]

        def stranger(conn, sock):
            try:
                client.attach(sock, rank=0, arena_memfd=None, policy=client.Policy())
            except OffloadError as e:
                conn.send(str(e))

        c = fork(stranger, str(sock))  # root again, through the client
        assert "uid" in c.recv()
        assert c.wait() == 0
        px.kill()
        text = log.read_text()
    assert "refused a connection from pid" in text and "uid 0" in text, text


def test_a_root_proxy_is_unreachable_for_another_uid():
    def stranger(conn, sock):
        try:
            socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET).connect(sock)
            conn.send("connected")
        except PermissionError:
            conn.send("denied")

    with scratch() as d:
        h = spawn.start_node_proxy(d / "run", [], expected=1, idle_timeout=5)
        assert oct(os.stat(d / "run").st_mode & 0o777) == "0o700"
        c = fork(stranger, str(h.socket_path), nobody=True)
        assert c.recv() == "denied"
        assert c.wait() == 0
        h.terminate()
        h.wait(5)


def test_signals_during_offloaded_calls_keep_native_semantics():
    """A rank bombarded with SIGALRM while its writes are in the proxy loses nothing and
    sees no EINTR (regular-file I/O is not interrupted natively either); the proxy never
    gets stuck on an interrupted call."""
    def rank(conn, sock, path):
        s = attach(sock)
        hits = [0]
        signal.signal(signal.SIGALRM, lambda *_: hits.__setitem__(0, hits[0] + 1))
        signal.setitimer(signal.ITIMER_REAL, 0.0002, 0.0002)
        fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600)
        block = b"z" * 4096
        short = writes = 0
        while writes < 1000 or (hits[0] < 200 and writes < 50_000):
            short += os.write(fd, block) != 4096
            writes += 1
        signal.setitimer(signal.ITIMER_REAL, 0)
        os.close(fd)
        conn.send((hits[0], writes, short, len(s.detach())))

    with scratch() as d:
        h = spawn.start_node_proxy(d / "run", [], expected=1)
        child = fork(rank, str(h.socket_path), str(d / "sig"))
        hits, writes, short, n = child.recv(60)
        assert child.wait() == 0 and h.wait(10) == 0
        assert os.path.getsize(d / "sig") == writes * 4096
    assert hits >= 200 and short == 0 and n >= writes


def test_nothing_is_left_behind_after_a_job():
    def rank(conn, sock, path):
        s = attach(sock)
        with open(path, "w") as f:
            f.write("x")
        conn.send(len(s.detach()))

    with scratch() as d:
        run = d / "run"
        h = spawn.start_node_proxy(run, [0], expected=2)
        children = [fork(rank, str(h.socket_path), str(d / f"f{i}")) for i in range(2)]
        assert all(c.recv() > 0 for c in children)
        assert all(c.wait() == 0 for c in children)
        assert h.wait(10) == 0
        assert not run.exists()  # socket and private directory removed
    assert not Path(f"/proc/{h.pid}").exists()
    assert _memfds_named("mckmpi-offload") == []


def test_the_proxy_ends_when_its_spawner_dies_before_any_rank():
    def spawner(conn, run):
        h = spawn.start_node_proxy(Path(run), [], idle_timeout=60)
        conn.send(h.pid)
        conn.recv()  # killed here

    with scratch() as d:
        sp = fork(spawner, str(d / "run"))
        pid = sp.recv()
        sp.kill()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.05)
        assert not _alive(pid)
        assert not (d / "run").exists()


def test_a_realtime_rank_starts_a_normal_proxy_that_ends_with_it():
    """A rank under SCHED_FIFO (lwk mode) spawns the proxy: the proxy must not inherit the
    policy, or its spinning serving thread starves its own main loop and it never exits."""
    if os.sched_get_priority_min(os.SCHED_FIFO) < 0:
        pytest.skip("no SCHED_FIFO")

    def rank(conn, run, path):
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        except PermissionError:
            conn.send(None)
            return
        h = spawn.start_node_proxy(Path(run), [os.sched_getaffinity(0).pop()], expected=1)
        conn.send((h.pid, os.sched_getscheduler(h.pid)))
        s = attach(h.socket_path)
        with open(path, "w") as f:
            f.write("x")
        conn.send(len(s.detach()))

    with scratch() as d:
        child = fork(rank, str(d / "run"), str(d / "f"))
        got = child.recv()
        if got is None:
            pytest.skip("not allowed to use SCHED_FIFO")
        pid, policy = got
        assert policy == os.SCHED_OTHER
        assert child.recv() > 0
        assert child.wait() == 0
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.05)
        assert not _alive(pid)
        assert not (d / "run").exists()


def test_a_proxy_whose_job_died_half_way_leaves_after_the_idle_timeout():
    """One of two expected ranks came and went (its node-mate never started): the proxy,
    started by hand with no parent to watch, must not wait forever."""
    def rank(conn, sock):
        s = attach(sock)
        conn.send(len(s.detach()))

    with scratch() as d:
        h = spawn.start_node_proxy(d / "run", [], expected=2, idle_timeout=1.0)
        child = fork(rank, str(h.socket_path))
        child.recv()
        assert child.wait() == 0
        assert h.wait(5) == 0
        assert not (d / "run").exists()


def test_leftovers_of_killed_proxies_are_swept_and_live_ones_kept():
    with scratch() as d:
        live = spawn.start_node_proxy(d / "live", [], idle_timeout=30)
        dead = spawn.start_node_proxy(d / "dead", [], idle_timeout=30)
        os.kill(dead.pid, signal.SIGKILL)
        dead.wait(5)
        assert spawn.socket_path(d / "dead").exists()  # SIGKILL: no chance to clean up
        (d / "young").mkdir(mode=0o700)  # a proxy about to listen
        (d / "old").mkdir(mode=0o700)
        os.utime(d / "old", (time.time() - 3600,) * 2)
        assert sorted(p.name for p in spawn.sweep_stale(d)) == ["dead", "old"]
        assert (d / "young").exists() and spawn.socket_path(d / "live").exists()
        live.terminate()
        assert live.wait(5) == 128 + signal.SIGTERM
        assert not (d / "live").exists()  # a terminated proxy cleans up after itself


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_attach_refuses_what_cannot_work():
    def rank(conn, sock):
        out = []
        try:
            client.attach(sock + ".missing", rank=0, arena_memfd=None, policy=client.Policy(),
                          timeout=0.2)
        except OffloadError as e:
            out.append(str(e))
        s = attach(sock)
        try:
            attach(sock)
        except OffloadError as e:
            out.append(str(e))
        try:
            spawn.start_node_proxy(Path(sock).parent / "other", [])
        except OffloadError as e:
            out.append(str(e))
        s.detach()
        try:
            s.detach()
        except OffloadError as e:
            out.append(str(e))
        conn.send(out)

    with scratch() as d:
        h = spawn.start_node_proxy(d / "run", [], expected=1)
        c = fork(rank, str(h.socket_path))
        msgs = c.recv()
        assert c.wait() == 0 and h.wait(10) == 0
    assert len(msgs) == 4, msgs
    assert "no offload proxy listening" in msgs[0]
    assert "already offloaded" in msgs[1]
    assert "inherit" in msgs[2]
    assert "already detached" in msgs[3]


def test_a_malformed_client_does_not_hurt_the_proxy():
    with scratch() as d:
        h = spawn.start_node_proxy(d / "run", [], expected=1)
        s = protocol.connect(str(h.socket_path))
        s.send(b"\xff not json")
        with pytest.raises(protocol.ProtocolError):
            protocol.recv(s)  # dropped
        s.close()
        s = protocol.connect(str(h.socket_path))
        protocol.send(s, {"op": "register"})
        reply, _ = protocol.recv(s)
        assert reply["ok"] is False and "order" in reply["error"]
        s.close()

        def rank(conn, sock, path):
            s = attach(sock)
            fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
            conn.send((fd >= FD_BASE, len(s.detach())))

        # not next to the socket: the proxy removes its directory once every rank came
        c = fork(rank, str(h.socket_path), str(d / "f"))
        assert c.recv()[0]
        assert c.wait() == 0 and h.wait(10) == 0


def test_fifos_are_opened_natively_without_side_effects():
    """Opening a FIFO blocks until the other end opens -- in the rank, not in the proxy,
    and the proxy must not open it itself (that would wake the writer too early)."""
    def rank(conn, sock, fifo, other):
        s = attach(sock)

        def reader():
            time.sleep(0.3)
            fd = os.open(fifo, os.O_RDONLY)
            got.append(os.read(fd, 100))
            os.close(fd)

        got: list[bytes] = []
        t = threading.Thread(target=reader)
        t.start()
        t0 = time.monotonic()
        fd = os.open(fifo, os.O_WRONLY)  # blocks natively until the reader opens
        waited = time.monotonic() - t0
        os.write(fd, b"through the fifo")
        os.close(fd)
        t.join()
        with open(other, "w") as f:  # the proxy is still serving
            f.write("ok")
        conn.send((waited, got, fd < FD_BASE, len(s.detach())))

    with scratch() as d:
        os.mkfifo(d / "ff")
        h = spawn.start_node_proxy(d / "run", [], expected=1)
        c = fork(rank, str(h.socket_path), str(d / "ff"), str(d / "other"))
        waited, got, native, n = c.recv()
        assert c.wait() == 0 and h.wait(10) == 0
        assert (d / "other").read_text() == "ok"
    assert waited >= 0.25 and got == [b"through the fifo"] and native and n > 0
