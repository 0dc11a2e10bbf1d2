"""Proof that the I/O really runs in the proxy, for Python code, numpy, threads, children and
a C binary; and the zero-copy arena path and the asynchronous channel."""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_offload_support import (
    attach,
    fork,
    io_counters,
    records_of,
    scratch,
    seccomp_mode,
)

from mckmpi.lwk.arena import Arena
from mckmpi.offload import accounting, spawn, syscalls
from mckmpi.offload.policy import Policy
from mckmpi.offload.syscalls import FD_BASE

pytestmark = pytest.mark.offload

MiB = 1 << 20


def _calls(rec: np.ndarray) -> set[str]:
    return {syscalls.name_of(c) for c in rec["call"]}


def _bytes(rec: np.ndarray, name: str) -> int:
    return int(rec["bytes"][rec["call"] == syscalls.table()[name].nr].sum())


def test_the_kernel_work_happens_in_the_proxy():
    """The rank's rchar/wchar stay flat while the proxy's grow by what the rank moved."""
    def rank(conn, sock, path):
        s = attach(sock)
        data = os.urandom(MiB)
        conn.send("ready")
        assert conn.recv() == "go"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        assert fd >= FD_BASE
        for i in range(8):
            assert os.write(fd, data) == MiB
        os.lseek(fd, 0, os.SEEK_SET)
        got = 0
        while chunk := os.read(fd, MiB):
            got += len(chunk)
        os.close(fd)
        conn.send(got)
        assert conn.recv() == "bye"
        conn.send(s.detach().tobytes())

    with scratch() as d:
        h = spawn.start_node_proxy(d / "run", [], expected=1)
        child = fork(rank, str(h.socket_path), str(d / "f"))
        assert child.recv() == "ready"
        r0, p0 = io_counters(child.pid), io_counters(h.pid)
        child.send("go")
        assert child.recv() == 8 * MiB
        r1, p1 = io_counters(child.pid), io_counters(h.pid)
        child.send("bye")
        rec = records_of(child.recv())
        assert child.wait() == 0 and h.wait(10) == 0
    # the rank moved only its few control-socket bytes itself
    assert r1["wchar"] - r0["wchar"] < 4096, (r0, r1)
    assert r1["rchar"] - r0["rchar"] < 4096, (r0, r1)
    assert p1["wchar"] - p0["wchar"] >= 8 * MiB, (p0, p1)
    assert p1["rchar"] - p0["rchar"] >= 8 * MiB, (p0, p1)
    assert _bytes(rec, "write") == 8 * MiB and _bytes(rec, "read") == 8 * MiB


def test_a_c_binary_exec_d_under_the_filter_is_offloaded():
    """The filter survives execve: /bin/cp opens and copies through the proxy."""
    def rank(conn, sock, a, b):
        attach(sock)
        os.execv("/bin/cp", ["cp", a, b])

    with scratch() as d:
        (d / "A").write_bytes(os.urandom(3 * MiB + 17))
        h = spawn.start_node_proxy(d / "run", [], expected=1, records_dir=d)
        child = fork(rank, str(h.socket_path), str(d / "A"), str(d / "B"))
        assert child.wait(30) == 0
        assert h.wait(10) == 0
        assert (d / "B").read_bytes() == (d / "A").read_bytes()
        (saved,) = d.glob("offload-rank0-*.npy")
        rec = np.load(saved)
    assert rec.dtype == accounting.RECORD_DTYPE
    opens = rec[(rec["call"] == syscalls.table()["openat"].nr) & (rec["result"] >= FD_BASE)]
    assert len(opens) >= 2  # the dynamic loader's libraries and cp's own files
    assert _bytes(rec, "copy_file_range") + _bytes(rec, "read") >= 3 * MiB + 17


def test_numpy_save_is_offloaded_and_recorded():
    def rank(conn, sock, path):
        s = attach(sock)
        a = np.arange(2_000_000, dtype=np.float64)
        np.save(path, a)
        ok = bool((np.load(path) == a).all())
        conn.send((ok, s.detach().tobytes()))

    with scratch() as d:
        h = spawn.start_node_proxy(d / "run", [], expected=1)
        child = fork(rank, str(h.socket_path), str(d / "x.npy"))
        ok, raw = child.recv()
        assert child.wait() == 0 and h.wait(10) == 0
        assert ok and (np.load(d / "x.npy") == np.arange(2_000_000.0)).all()
    rec = records_of(raw)
    # numpy writes the data through a dup of the file (fcntl F_DUPFD_CLOEXEC): offloaded too
    assert _bytes(rec, "write") >= 16_000_000 and _bytes(rec, "read") >= 16_000_000
    assert {"openat", "fcntl", "close"} <= _calls(rec)
    assert (rec["rank"] == 0).all() and (rec["done_ns"] >= rec["trap_ns"]).all()


def test_threads_that_existed_before_attach_are_offloaded():
    """TSYNC: a helper thread started before the filter (as MPI's are) is covered."""
    def rank(conn, sock, path):
        go, done = threading.Event(), []
        t = threading.Thread(target=lambda: (go.wait(), done.append(os.open(path, os.O_CREAT | os.O_WRONLY))))
        t.start()
        s = attach(sock)
        go.set()
        t.join()
        os.write(done[0], b"from a thread")
        conn.send((done[0], s.detach().tobytes()))

    with scratch() as d:
        h = spawn.start_node_proxy(d / "run", [], expected=1)
        child = fork(rank, str(h.socket_path), str(d / "t"))
        fd, raw = child.recv()
        assert child.wait() == 0 and h.wait(10) == 0
        assert (d / "t").read_bytes() == b"from a thread"
    assert fd >= FD_BASE
    rec = records_of(raw)
    calls = [(syscalls.name_of(r["call"]), int(r["pid"]), int(r["fd"])) for r in rec]
    assert len(set(rec["pid"])) == 2, calls  # main thread and helper thread both trapped


def test_children_of_a_rank_are_served_and_share_offsets():
    """A forked child writes through an inherited offloaded fd (one offset); a shell run by
    the rank creates files through the proxy too."""
    def rank(conn, sock, d):
        s = attach(sock)
        fd = os.open(f"{d}/shared", os.O_CREAT | os.O_WRONLY, 0o644)
        os.write(fd, b"parent1 ")
        pid = os.fork()
        if pid == 0:
            os.write(fd, b"child ")
            os._exit(0)
        os.waitpid(pid, 0)
        os.write(fd, b"parent2")
        os.close(fd)
        subprocess.run(["/bin/sh", "-c", f"echo shell > {d}/sh.txt"], check=True, timeout=20)
        conn.send(s.detach().tobytes())

    with scratch() as d:
        h = spawn.start_node_proxy(d / "run", [], expected=1)
        child = fork(rank, str(h.socket_path), str(d))
        rec = records_of(child.recv())
        assert child.wait() == 0 and h.wait(10) == 0
        assert (d / "shared").read_bytes() == b"parent1 child parent2"
        assert (d / "sh.txt").read_text() == "shell\n"
    assert len(set(rec["pid"])) >= 3  # rank, forked child, shell (and echo's redirection)


def test_excluded_paths_stay_native_and_include_wins_over_exclude():
    def rank(conn, sock, shm):
        s = attach(sock, policy=Policy(include=(shm,)))
        with open("/proc/self/status") as f:  # must describe the rank, not the proxy
            pid_line = next(line for line in f if line.startswith("Pid:"))
        null = os.open("/dev/null", os.O_WRONLY)
        mine = os.open(f"{shm}/in", os.O_CREAT | os.O_WRONLY, 0o600)
        other = os.open("/dev/shm", os.O_RDONLY)
        conn.send((int(pid_line.split()[1]) == os.getpid(), null, mine, other, seccomp_mode()))
        s.detach()

    d = Path(f"/dev/shm/mckmpi-offload-test-{os.getpid()}")
    d.mkdir()
    try:
        with scratch() as run:
            h = spawn.start_node_proxy(run / "run", [], expected=1)
            child = fork(rank, str(h.socket_path), str(d))
            own_pid, null, mine, other, mode = child.recv()
            assert child.wait() == 0 and h.wait(10) == 0
    finally:
        for f in d.iterdir():
            f.unlink()
        d.rmdir()
    assert own_pid and mode == 2
    assert null < FD_BASE and other < FD_BASE and mine >= FD_BASE


def test_offload_none_installs_no_filter():
    def rank(conn):
        from mckmpi.offload import client

        s = client.attach("/nonexistent/proxy.sock", rank=3, arena_memfd=None,
                          policy=Policy(mode="none"))
        fd = os.open("/dev/null", os.O_RDONLY)
        conn.send((s.active, seccomp_mode(), fd < FD_BASE, len(s.detach())))

    child = fork(rank)
    assert child.recv() == (False, 0, True, 0)
    assert child.wait() == 0


def test_arena_buffers_move_without_a_copy():
    def rank(conn, sock, path):
        arena = Arena(8 * MiB, hugepages="never", lock="never")
        s = attach(sock, arena_memfd=arena.memfd, arena_address=arena.address)
        a = arena.empty(MiB // 8, np.float64)
        a[:] = np.arange(a.size)
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
        os.write(fd, a)                  # numpy buffer in the arena: zero-copy
        os.write(fd, a.tobytes()[:100])  # ordinary memory: through the bounce buffer
        b = arena.empty(MiB // 8, np.float64)
        os.preadv(fd, [b], 0)
        conn.send((s.zero_copy, bool((a == b).all()), s.detach().tobytes()))

    with scratch() as d:
        h = spawn.start_node_proxy(d / "run", [], expected=1)
        child = fork(rank, str(h.socket_path), str(d / "a.bin"))
        zero_copy, same, raw = child.recv()
        assert child.wait() == 0 and h.wait(10) == 0
        assert os.path.getsize(d / "a.bin") == MiB + 100
    rec = records_of(raw)
    data = rec[np.isin(rec["call"], [syscalls.table()[n].nr for n in ("write", "preadv2")])]
    assert zero_copy and same
    assert [(int(r["bytes"]), bool(r["how"] & accounting.ZERO_COPY)) for r in data] == [
        (MiB, True), (100, False), (MiB, True)]


def test_channel_writes_asynchronously_from_the_arena():
    def rank(conn, sock, path):
        arena = Arena(16 * MiB, hugepages="never", lock="never")
        s = attach(sock, arena_memfd=arena.memfd, arena_address=arena.address)
        ch = s.channel(slots=4)
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
        chunks = [arena.full(MiB // 8, float(i)) for i in range(10)]
        done: list[int] = []
        for i, c in enumerate(chunks):  # more than the ring holds: submit waits for room
            ch.write(fd, i * MiB, c, on_done=done.append)
        busy = 0
        while ch.pending():
            busy += 1
            ch.poll()
        ch.fsync(fd)
        ch.wait()
        back = arena.empty(MiB // 8, np.float64)
        t = ch.read(fd, 3 * MiB, back)
        ch.wait(t)
        ok = ch.result(t) == MiB and bool((back == 3.0).all())
        bad = ch.write(fd + 1, 0, chunks[0])  # not an offloaded descriptor
        ch.wait(bad)
        conn.send((done, ok, ch.result(bad), s.detach().tobytes()))
        ch.close()

    with scratch() as d:
        h = spawn.start_node_proxy(d / "run", [], expected=1)
        child = fork(rank, str(h.socket_path), str(d / "ckpt"))
        done, ok, bad, raw = child.recv()
        assert child.wait() == 0 and h.wait(10) == 0
        data = np.fromfile(d / "ckpt", dtype=np.float64).reshape(10, -1)
    assert done == [MiB] * 10 and ok and bad == -9  # EBADF
    assert (data == np.arange(10.0)[:, None]).all()
    rec = records_of(raw)
    chan = rec[(rec["how"] & accounting.CHANNEL) != 0]
    assert len(chan) == 13 and (chan["how"][chan["bytes"] > 0] & accounting.ZERO_COPY).all()


def test_a_rank_blocked_in_a_trapped_call_survives_registration_of_others():
    """Two ranks on one proxy are served concurrently: one blocked in fsync-heavy work does
    not stall the other's small calls for long."""
    def slow(conn, sock, path):
        s = attach(sock, rank=0)
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
        conn.send("ready")
        t_end = time.monotonic() + 1.0
        while time.monotonic() < t_end:
            os.write(fd, b"x" * MiB)
            os.fsync(fd)
        s.detach()
        conn.send("done")

    def fast(conn, sock, path):
        s = attach(sock, rank=1)
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
        conn.recv()
        worst = 0
        for _ in range(200):
            t = time.monotonic_ns()
            os.pwrite(fd, b"y", 0)
            worst = max(worst, time.monotonic_ns() - t)
        s.detach()
        conn.send(worst)

    with scratch() as d:
        h = spawn.start_node_proxy(d / "run", [], expected=2)
        a = fork(slow, str(h.socket_path), str(d / "slow"))
        b = fork(fast, str(h.socket_path), str(d / "fast"))
        assert a.recv() == "ready"
        b.send("go")
        worst = b.recv()
        assert a.recv() == "done"
        assert a.wait() == 0 and b.wait() == 0 and h.wait(10) == 0
    assert worst < 0.5e9, worst


def test_sha_of_files_written_offloaded_matches():
    """Large unaligned writes through the bounce buffer (beyond its 4 MiB) arrive intact."""
    payload = os.urandom(9 * MiB + 123)

    def rank(conn, sock, path):
        s = attach(sock)
        with open(path, "wb") as f:
            f.write(payload)
        with open(path, "rb") as f:
            back = f.read()
        conn.send((hashlib.sha1(back).hexdigest(), s.detach().tobytes()))

    with scratch() as d:
        h = spawn.start_node_proxy(d / "run", [], expected=1)
        child = fork(rank, str(h.socket_path), str(d / "big"))
        sha, raw = child.recv()
        assert child.wait() == 0 and h.wait(10) == 0
        assert hashlib.sha1((d / "big").read_bytes()).hexdigest() == hashlib.sha1(payload).hexdigest()
    assert sha == hashlib.sha1(payload).hexdigest()
    assert _bytes(records_of(raw), "write") == len(payload)


def test_a_scheduler_task_waits_on_the_channel_while_another_computes():
    """The LWK scheduler polls the channel: a checkpoint task blocks on its completion
    events while a compute task keeps the core."""
    def rank(conn, sock, path):
        from mckmpi.lwk.scheduler import Event, Scheduler, yield_

        arena = Arena(8 * MiB, hugepages="never", lock="never")
        s = attach(sock, arena_memfd=arena.memfd, arena_address=arena.address)
        ch = s.channel(slots=2)
        sched = Scheduler()
        ch.register(sched)
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
        state = {"steps": 0, "done": False, "results": []}

        def checkpoint():
            for i in range(6):
                ev = Event(f"chunk {i}")
                ch.write(fd, i * MiB, arena.full(MiB // 8, float(i)),
                         on_done=lambda r, ev=ev: (state["results"].append(r), ev.set()))
                ev.wait()
            state["done"] = True

        def compute():
            while not state["done"]:
                state["steps"] += 1
                yield_()

        sched.spawn(checkpoint)
        sched.spawn(compute)
        sched.run()
        conn.send((state["results"], state["steps"], len(s.detach())))

    with scratch() as d:
        h = spawn.start_node_proxy(d / "run", [], expected=1)
        child = fork(rank, str(h.socket_path), str(d / "ckpt"))
        results, steps, n = child.recv()
        assert child.wait() == 0 and h.wait(10) == 0
        data = np.fromfile(d / "ckpt", dtype=np.float64).reshape(6, -1)
    assert results == [MiB] * 6 and steps > 6 and n >= 7
    assert (data == np.arange(6.0)[:, None]).all()
