"""Differential tests: random file-operation sequences give the same results and errno
offloaded through the proxy as natively, and leave the same files behind."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_offload_support import (
    NAMES,
    NOBODY,
    attach,
    fork,
    nobody_proxy,
    ops_server,
    records_of,
    scratch,
    tree,
)

from mckmpi.offload import accounting, server, spawn, syscalls

pytestmark = pytest.mark.offload

O = os
FLAGS = [
    O.O_RDONLY, O.O_WRONLY | O.O_CREAT, O.O_RDWR | O.O_CREAT, O.O_RDWR | O.O_CREAT | O.O_EXCL,
    O.O_WRONLY | O.O_APPEND | O.O_CREAT, O.O_RDWR | O.O_TRUNC, O.O_RDONLY | O.O_DIRECTORY,
    O.O_WRONLY, O.O_RDWR | O.O_APPEND, O.O_RDONLY | O.O_NOFOLLOW, O.O_WRONLY | O.O_CREAT | O.O_CLOEXEC,
]
OFFSETS = [0, 1, 100, 4095, 4096, 1 << 20, (1 << 32) + 7, 5 << 30, -1]
name = st.sampled_from(NAMES)
slot = st.integers(0, 5)
data = st.binary(max_size=300)
size = st.integers(0, 600)
offset = st.sampled_from(OFFSETS)

op = st.one_of(
    st.tuples(st.just("open"), name, st.sampled_from(FLAGS), st.sampled_from([0o644, 0o600, 0o755])),
    st.tuples(st.just("openat"), slot, name, st.sampled_from(FLAGS)),
    st.tuples(st.just("dup"), slot),
    st.tuples(st.just("close"), slot),
    st.tuples(st.just("read"), slot, size),
    st.tuples(st.just("write"), slot, data),
    st.tuples(st.just("pread"), slot, size, offset),
    st.tuples(st.just("pwrite"), slot, data, offset),
    st.tuples(st.just("readv"), slot, st.lists(st.integers(0, 200), max_size=3)),
    st.tuples(st.just("writev"), slot, st.lists(data, max_size=3)),
    st.tuples(st.just("preadv"), slot, st.lists(st.integers(0, 200), max_size=3), offset),
    st.tuples(st.just("pwritev"), slot, st.lists(data, max_size=3), offset),
    st.tuples(st.just("lseek"), slot, offset, st.sampled_from([0, 1, 2, 3, 4, 7])),
    st.tuples(st.just("ftruncate"), slot, st.sampled_from([0, 10, 5000, -1])),
    st.tuples(st.just("fstat"), slot),
    st.tuples(st.just("getfl"), slot),
    st.tuples(st.just("fsync"), slot),
    st.tuples(st.just("fallocate"), slot, st.sampled_from([0, 100]), st.sampled_from([1, 8192])),
    st.tuples(st.just("getdents"), slot),
    st.tuples(st.just("copy"), slot, slot, st.integers(0, 1000)),
    st.tuples(st.just("sendfile"), slot, slot, st.integers(0, 1000)),
    st.tuples(st.just("efault"), slot, st.booleans()),
    st.tuples(st.sampled_from(["stat", "lstat", "unlink", "rmdir", "readlink"]), name),
    st.tuples(st.just("access"), name, st.sampled_from([os.F_OK, os.R_OK, os.W_OK | os.X_OK])),
    st.tuples(st.just("mkdir"), name, st.sampled_from([0o755, 0o700])),
    st.tuples(st.just("rename"), name, name),
    st.tuples(st.just("symlink"), st.sampled_from(["a", "d", "missing"]), name),
    st.tuples(st.just("chmod"), name, st.sampled_from([0o000, 0o200, 0o644])),
    st.tuples(st.just("truncate"), name, st.sampled_from([0, 7, -1])),
)
programs = st.lists(op, min_size=1, max_size=25)

RW, CREAT = O.O_RDWR | O.O_CREAT, O.O_CREAT
#: the error cases of the specification, each made certain rather than left to chance
EDGE_CASES = [
    # EFAULT leaves the offset alone; a later read sees the same bytes
    [("open", "a", RW, 0o644), ("write", 0, b"0123456789abcdef" * 4), ("lseek", 0, 0, 0),
     ("efault", 0, False), ("lseek", 0, 0, 1), ("read", 0, 8), ("efault", 0, True),
     ("lseek", 0, 0, 1)],
    # O_EXCL on an existing file, ENOENT, ENOTDIR, EISDIR
    [("open", "a", RW, 0o644), ("open", "a", RW | O.O_EXCL, 0o644), ("open", "b", O.O_RDONLY, 0),
     ("open", "a/x", RW, 0o644), ("mkdir", "d", 0o755), ("open", "d", O.O_WRONLY, 0),
     ("open", "d", O.O_RDONLY, 0), ("read", 1, 10), ("getdents", 1), ("open", "nodir/x", RW, 0o644),
     ("stat", "a/x"), ("rmdir", "a"), ("unlink", "d")],
    # EBADF: closed descriptor, writing a read-only one, reading a write-only one
    [("open", "a", RW, 0o644), ("close", 0), ("read", 0, 4), ("write", 0, b"x"), ("fstat", 0),
     ("open", "a", O.O_RDONLY, 0), ("write", 1, b"x"), ("efault", 1, True),
     ("open", "a", O.O_WRONLY, 0), ("read", 2, 4), ("efault", 2, False), ("ftruncate", 1, 0)],
    # O_APPEND (pwrite appends on Linux), short reads, lseek past EOF, holes
    [("open", "a", O.O_WRONLY | O.O_APPEND | CREAT, 0o644), ("write", 0, b"abc"),
     ("pwrite", 0, b"XY", 0), ("lseek", 0, 0, 1), ("open", "a", O.O_RDONLY, 0),
     ("read", 1, 100), ("read", 1, 100), ("lseek", 1, 4096, 0), ("pread", 1, 10, 1),
     ("open", "b", RW, 0o644), ("lseek", 2, 10000, 0), ("write", 2, b"end"), ("fstat", 2),
     ("lseek", 2, 0, 3), ("lseek", 2, 0, 4), ("lseek", 2, 20000, 3), ("pread", 2, 20, 9995)],
    # offsets beyond 4 GiB; negative offsets
    [("open", "a", RW, 0o644), ("pwrite", 0, b"far", (5 << 30) + 3), ("fstat", 0),
     ("pread", 0, 10, (5 << 30)), ("lseek", 0, (1 << 32) + 7, 0), ("write", 0, b"w"),
     ("lseek", 0, -1, 0), ("pwrite", 0, b"n", -1), ("pread", 0, 1, -1), ("ftruncate", 0, -1),
     ("truncate", "a", (1 << 33)), ("stat", "a")],
    # duplicates share the offset; vectored I/O; copies
    [("open", "a", RW, 0o644), ("dup", 0), ("write", 0, b"hello "), ("write", 1, b"world"),
     ("lseek", 0, 0, 1), ("lseek", 1, 0, 0), ("readv", 1, [3, 0, 20]),
     ("writev", 0, [b"ab", b"", b"cd"]), ("open", "b", RW, 0o644), ("lseek", 0, 0, 0),
     ("copy", 2, 0, 5), ("sendfile", 2, 0, 100), ("fstat", 2), ("getfl", 1),
     ("open", "c", O.O_WRONLY | O.O_CREAT | O.O_CLOEXEC, 0o600), ("getfl", 3)],
    # path calls through a directory descriptor and a symlink
    [("mkdir", "d", 0o755), ("open", "d", O.O_RDONLY | O.O_DIRECTORY, 0),
     ("openat", 0, "e", RW), ("write", 1, b"in d"), ("symlink", "d", "ln"), ("readlink", "ln"),
     ("readlink", "d"), ("lstat", "ln"), ("stat", "ln"), ("open", "ln", O.O_RDONLY | O.O_NOFOLLOW, 0),
     ("rename", "d/e", "b"), ("access", "b", os.W_OK), ("getdents", 0), ("openat", 1, "x", RW)],
]


def _halves(root):
    """Directories for the native and the offloaded rank, owned like `root`."""
    (root / "native").mkdir()
    (root / "offl").mkdir()
    os.chown(root / "native", *(2 * [os.stat(root).st_uid]))
    os.chown(root / "offl", *(2 * [os.stat(root).st_uid]))
    return root / "native", root / "offl"


def _check(native, offl, nroot, oroot, program):
    n_case, n_res = native.call(program)
    o_case, o_res = offl.call(program)
    for i, (a, b) in enumerate(zip(n_res, o_res)):
        assert a == b, f"op {i} {program[i]!r}: native {a!r}, offloaded {b!r}\n{program}"
    assert tree(nroot / n_case) == tree(oroot / o_case), program
    return o_res


def _finish(native, offl):
    native.send(None)
    offl.send(None)
    assert native.recv() == b""
    rec = records_of(offl.recv())
    assert native.wait() == 0 and offl.wait() == 0
    return rec


def test_random_file_operations_match_native_as_root():
    with scratch() as root:
        nroot, oroot = _halves(root)
        handle = spawn.start_node_proxy(root / "run", [], expected=1)
        native = fork(ops_server, str(nroot), None)
        offl = fork(ops_server, str(oroot), str(handle.socket_path))

        @settings(max_examples=1500, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow])
        @given(programs)
        def run(program):
            _check(native, offl, nroot, oroot, program)

        try:
            for case in EDGE_CASES:
                _check(native, offl, nroot, oroot, case)
            run()
        finally:
            rec = _finish(native, offl)
        assert handle.wait(10) == 0
        calls = {syscalls.name_of(c) for c in rec["call"]}
        # the sequences really went through the proxy
        assert {"openat", "pwrite64", "pread64", "lseek", "getdents64", "copy_file_range",
                "mkdir", "unlink", "rename"} <= calls, calls


def test_random_file_operations_match_native_as_unprivileged_user():
    """As nobody, permission errors (an unreadable file, EACCES) must match too."""
    with scratch(owner=NOBODY) as root:
        nroot, oroot = _halves(root)
        log = root / "proxy.log"
        px, sock = nobody_proxy(root / "run", 1, log)
        native = fork(ops_server, str(nroot), None, nobody=True)
        offl = fork(ops_server, str(oroot), str(sock), nobody=True)
        fixed = [("open", "a", os.O_WRONLY | os.O_CREAT, 0o600), ("write", 0, b"secret"),
                 ("chmod", "a", 0o000), ("open", "a", os.O_RDONLY, 0), ("access", "a", os.R_OK),
                 ("stat", "a"), ("mkdir", "d", 0o700), ("chmod", "d", 0o500),
                 ("stat", "d/e"), ("open", "d/e", os.O_WRONLY | os.O_CREAT, 0o600),
                 ("getdents", 1), ("chmod", "d", 0o700), ("truncate", "a", 1)]

        @settings(max_examples=150, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow])
        @given(programs)
        def run(program):
            _check(native, offl, nroot, oroot, program)

        try:
            results = _check(native, offl, nroot, oroot, fixed)
            assert results[3] == ("err", "EACCES") and results[9] == ("err", "EACCES"), results
            run()
        finally:
            _finish(native, offl)
        assert px.wait(10) == 0, log.read_text()


#: hot calls of every size class the compiled path answers (bounce buffer up to 4 MiB)
HOT_CASES = [
    [("open", "a", RW, 0o644), ("write", 0, b"h" * 70_000), ("pwrite", 0, b"p" * 300_000, 5),
     ("lseek", 0, 0, 0), ("read", 0, 200_000), ("read", 0, 200_000), ("pread", 0, 5_000_000, 0),
     ("pread", 0, 100, 1 << 40), ("open", "a", O.O_RDONLY, 0), ("pwrite", 1, b"x", 0),
     ("write", 1, b"y"), ("open", "a", O.O_WRONLY, 0), ("read", 2, 10), ("pread", 2, 10, 0),
     ("efault", 0, True), ("efault", 0, False), ("lseek", 0, 0, 1), ("close", 0),
     ("write", 0, b"closed"), ("pread", 0, 4, 0)],
]


def test_the_compiled_and_the_interpreted_proxy_answer_alike():
    """The compiled hot path gives what the Python handlers give: results, errno, files
    and every field of the records but the times and the caller's pid."""
    with scratch() as root:
        croot, iroot = _halves(root)
        log = root / "compiled.log"
        compiled, sock = _logged_proxy(root / "run-c", log)
        interpreted = spawn.start_node_proxy(root / "run-i", [], expected=1, compiled=False)
        a = fork(ops_server, str(croot), str(sock))
        b = fork(ops_server, str(iroot), str(interpreted.socket_path))

        @settings(max_examples=200, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow])
        @given(programs)
        def run(program):
            _check(a, b, croot, iroot, program)

        try:
            for case in HOT_CASES + EDGE_CASES:
                _check(a, b, croot, iroot, case)
            run()
        finally:
            rec_a = _finish_offloaded(a)
            rec_b = _finish_offloaded(b)
        assert compiled.wait(10) == 0 and interpreted.wait(10) == 0
        assert "the proxy failed" not in log.read_text()  # the compiled path served to the end
        fields = ["call", "bytes", "result", "errno", "fd", "how"]
        assert len(rec_a) == len(rec_b) > 1000
        for f in fields:
            assert (rec_a[f] == rec_b[f]).all(), f
        assert {"pwrite64", "pread64", "read", "write"} <= {syscalls.name_of(c) for c in rec_a["call"]}


def _serve_logged(conn, sock: str) -> None:
    conn.close()
    os._exit(server.serve(sock, expected=1, parent_pid=os.getppid(), idle_timeout=30))


def _logged_proxy(run_dir, log):
    """A compiled proxy whose stderr goes to `log` (it says there if it left the C path)."""
    run_dir.mkdir(mode=0o700)
    path = spawn.socket_path(run_dir)
    child = fork(_serve_logged, str(path), stderr_path=str(log))
    spawn.wait_for_socket(path, 10)
    return child, path


def _finish_offloaded(rank):
    rank.send(None)
    rec = records_of(rank.recv())
    assert rank.wait() == 0
    return rec


def _arena_rank(conn, root: str, sock: str) -> None:
    """Data calls with arena buffers (zero copy), ordinary ones and both in one iovec array."""
    import numpy as np

    from mckmpi.lwk.arena import Arena

    arena = Arena(8 << 20, hugepages="never", lock="auto")
    session = attach(sock, arena_memfd=arena.memfd, arena_address=arena.address)
    src = arena.empty(3 << 20, dtype=np.uint8)
    src[:] = np.arange(src.size, dtype=np.uint64).astype(np.uint8)
    dst = arena.zeros(3 << 20, dtype=np.uint8)
    plain = bytearray(b"q" * 5000)
    out = []
    fd = os.open(f"{root}/f", os.O_CREAT | os.O_RDWR, 0o644)
    ro = os.open(f"{root}/f", os.O_RDONLY)
    steps = [
        lambda: os.pwrite(fd, src[:1 << 20], 0),
        lambda: os.write(fd, src[5:70_000]),
        lambda: os.pread(fd, 10, 3),
        lambda: os.preadv(fd, [dst[:100_000]], 7),
        lambda: os.readv(fd, [dst[:10], dst[100:5000]]),
        lambda: os.writev(fd, [src[:3000], src[9000:9100]]),
        lambda: os.pwritev(fd, [src[:1 << 20], plain, src[4:400]], 11),
        lambda: os.writev(fd, [plain, bytes(300)]),
        lambda: os.preadv(fd, [dst[:2 << 20], dst[(2 << 20):]], 0),
        lambda: os.preadv(fd, [dst[:64], plain], 1),
        lambda: os.preadv(fd, [dst[:64]], 0, os.RWF_HIPRI),
        lambda: os.pwritev(fd, [src[:10]], 5),
        lambda: os.writev(ro, [src[:10]]),
        lambda: os.pwrite(ro, src[:10], 0),
        lambda: os.readv(fd, []),
        lambda: os.lseek(fd, 0, os.SEEK_CUR),
        lambda: int(dst[:3 << 20].astype(np.uint64).sum()),
    ]
    for step in steps:
        try:
            out.append(("ok", step()))
        except OSError as e:
            out.append(("err", e.errno))
    os.close(ro)
    os.close(fd)
    conn.send(out)
    conn.send(session.detach().tobytes())


def test_the_compiled_path_moves_arena_and_vectored_data_as_the_handlers_do():
    with scratch() as root:
        croot, iroot = _halves(root)
        compiled = spawn.start_node_proxy(root / "run-c", [], expected=1)
        interpreted = spawn.start_node_proxy(root / "run-i", [], expected=1, compiled=False)
        a = fork(_arena_rank, str(croot), str(compiled.socket_path))
        b = fork(_arena_rank, str(iroot), str(interpreted.socket_path))
        out_a, out_b = a.recv(), b.recv()
        rec_a, rec_b = records_of(a.recv()), records_of(b.recv())
        assert a.wait() == 0 and b.wait() == 0
        assert compiled.wait(10) == 0 and interpreted.wait(10) == 0
        assert out_a == out_b
        assert ("err", 9) in out_a  # EBADF on the read-only descriptor
        assert (croot / "f").read_bytes() == (iroot / "f").read_bytes()
        for f in ["call", "bytes", "result", "errno", "fd", "how"]:
            assert (rec_a[f] == rec_b[f]).all(), (f, rec_a[f], rec_b[f])
        zero_copy = rec_a["how"] & accounting.ZERO_COPY != 0
        moved = {syscalls.name_of(c) for c in rec_a["call"][zero_copy]}
        assert {"pwrite64", "write", "readv", "writev"} <= moved, moved
        assert moved & {"preadv", "preadv2"} and moved & {"pwritev", "pwritev2"}, moved
