"""The offload's pure parts: syscall table, BPF program, policy, records, protocol."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
from test_offload_support import seccomp_mode

from mckmpi.errors import FeatureUnavailable, UsageError
from mckmpi.offload import accounting, protocol, ring, seccomp, spawn, syscalls
from mckmpi.offload.errors import OffloadError
from mckmpi.offload.loop import Emulator
from mckmpi.offload.policy import Policy, absolute

NOTIFY, ALLOW = seccomp.RET_USER_NOTIF, seccomp.RET_ALLOW
BASE = 4096


def test_every_trapped_call_has_a_handler_and_numbers_are_unique():
    rows = list(syscalls.table().values())
    assert len({r.nr for r in rows}) == len(rows)
    for r in syscalls.trapped():  # identity changes share one handler
        assert r.kind == "identity" or callable(getattr(Emulator, f"_sys_{r.name}", None)), r.name
    names = {r.name for r in syscalls.trapped()}
    required = {"openat", "open", "creat", "newfstatat", "stat", "lstat", "statx", "access",
                "faccessat", "faccessat2", "unlinkat", "unlink", "mkdirat", "mkdir", "renameat",
                "renameat2", "rename", "readlinkat", "readlink", "truncate", "rmdir", "read",
                "write", "pread64", "pwrite64", "readv", "writev", "preadv", "pwritev", "lseek",
                "fsync", "fdatasync", "ftruncate", "fallocate", "fstat", "getdents64", "close"}
    assert required <= names, required - names
    assert syscalls.name_of(18) == "pwrite64" and syscalls.name_of(9999) == "sys_9999"


def test_other_architectures_are_refused_clearly():
    with pytest.raises(FeatureUnavailable, match="only x86_64"):
        syscalls.table("aarch64")


@pytest.fixture(scope="module")
def prog() -> bytes:
    return seccomp.build_filter(BASE)


def test_path_and_observed_calls_always_notify(prog):
    for r in syscalls.table().values():
        if r.kind in ("path", "observe"):
            assert seccomp.run_filter(prog, r.nr, (3, 0, 0, 0)) == NOTIFY, r.name


def test_fd_calls_notify_only_for_offloaded_descriptors(prog):
    for r in syscalls.table().values():
        if r.kind != "fd":
            continue
        extra = {}
        if r.arg_in is not None:
            extra[r.arg_in[0]] = r.arg_in[1][0]

        def args(fd_at: int | None, fd: int, extra: dict[int, int] = extra) -> tuple[int, ...]:
            a = [5, 5, 5, 5, 5, 5]  # low, native descriptors elsewhere
            for i, v in extra.items():
                a[i] = v
            if fd_at is not None:
                a[fd_at] = fd
            return tuple(a)

        assert seccomp.run_filter(prog, r.nr, args(None, 0)) == ALLOW, r.name
        for i in r.fd_args:
            assert seccomp.run_filter(prog, r.nr, args(i, BASE)) == NOTIFY, (r.name, i)
            assert seccomp.run_filter(prog, r.nr, args(i, BASE + 7 + (5 << 32))) == NOTIFY, r.name
            assert seccomp.run_filter(prog, r.nr, args(i, BASE - 1)) == ALLOW, r.name
            assert seccomp.run_filter(prog, r.nr, args(i, 0xFFFFFFFF)) == ALLOW, r.name  # -1
            assert seccomp.run_filter(prog, r.nr, args(i, 0x7FFFFFFF)) == NOTIFY, r.name
        if r.also_below:  # close of a standard stream is seen too
            assert seccomp.run_filter(prog, r.nr, args(r.fd_args[0], 2)) == NOTIFY, r.name
            assert seccomp.run_filter(prog, r.nr, args(r.fd_args[0], 3)) == ALLOW, r.name


def test_fcntl_is_trapped_only_for_duplication(prog):
    fcntl_nr = syscalls.table()["fcntl"].nr
    assert seccomp.run_filter(prog, fcntl_nr, (BASE, syscalls.F_DUPFD)) == NOTIFY
    assert seccomp.run_filter(prog, fcntl_nr, (BASE, syscalls.F_DUPFD_CLOEXEC)) == NOTIFY
    for cmd in (1, 2, 3, 4):  # F_GETFD, F_SETFD, F_GETFL, F_SETFL
        assert seccomp.run_filter(prog, fcntl_nr, (BASE, cmd)) == ALLOW


def test_identity_changes_are_trapped_and_only_those(prog):
    t = syscalls.table()
    for name in ("setuid", "setresuid", "setgroups", "capset", "chroot", "unshare", "setns",
                 "setfsuid", "landlock_restrict_self"):
        assert seccomp.run_filter(prog, t[name].nr, (0, 0, 0)) == NOTIFY, name
    fsize, nofile, cpu = syscalls.RLIMIT_FSIZE, syscalls.RLIMIT_NOFILE, 0
    assert seccomp.run_filter(prog, t["setrlimit"].nr, (fsize,)) == NOTIFY
    assert seccomp.run_filter(prog, t["setrlimit"].nr, (nofile,)) == NOTIFY
    assert seccomp.run_filter(prog, t["setrlimit"].nr, (cpu,)) == ALLOW
    assert seccomp.run_filter(prog, t["prlimit64"].nr, (0, fsize, 1)) == NOTIFY
    assert seccomp.run_filter(prog, t["prlimit64"].nr, (0, 3, 1)) == ALLOW  # RLIMIT_STACK
    assert seccomp.run_filter(prog, t["prctl"].nr, (syscalls.PR_CAPBSET_DROP,)) == NOTIFY
    assert seccomp.run_filter(prog, t["prctl"].nr, (15,)) == ALLOW  # PR_SET_NAME
    # dup2/dup3 of an offloaded descriptor onto a low number: seen, so it is recorded
    assert seccomp.run_filter(prog, t["dup2"].nr, (BASE, 1)) == NOTIFY
    assert seccomp.run_filter(prog, t["dup3"].nr, (3, 1, 0)) == ALLOW


def test_native_unknown_and_foreign_arch_calls_are_allowed(prog):
    for r in syscalls.table().values():
        if r.kind == "native":
            assert seccomp.run_filter(prog, r.nr, (BASE, BASE, BASE)) == ALLOW, r.name
    assert seccomp.run_filter(prog, 39, ()) == ALLOW  # getpid
    assert seccomp.run_filter(prog, 0x40000000 | 257, ()) == ALLOW  # x32 ABI openat
    assert seccomp.run_filter(prog, 5, (BASE,), arch=0x40000003) == ALLOW  # i386 int 0x80


def test_filter_base_is_respected():
    p = seccomp.build_filter(100)
    assert seccomp.run_filter(p, 1, (100,)) == NOTIFY
    assert seccomp.run_filter(p, 1, (99,)) == ALLOW
    with pytest.raises(ValueError):
        seccomp.build_filter(0)


def test_probe_runs_in_a_child_and_leaves_this_process_unfiltered():
    found = seccomp.probe()
    assert found["kernel"] == os.uname().release
    assert set(found) >= {"user_notif", "addfd", "addfd_send", "wait_killable_recv", "offload_ok"}
    assert seccomp_mode() == 0


def test_policy_longest_prefix_wins():
    p = Policy()
    assert p.offloads("/tmp/x") and p.offloads("/home/u/f")
    assert not p.offloads("/proc/self/status") and not p.offloads("/dev/shm/seg")
    assert not p.offloads("/sys/devices") and p.offloads("/devices/x")
    q = Policy(include=("/dev/shm/job",), exclude=("/dev", "/scratch"))
    assert q.offloads("/dev/shm/job/f") and not q.offloads("/dev/shm/other")
    assert not q.offloads("/scratch/a") and not q.offloads("/proc/1") and q.offloads("/sys/x")
    r = Policy(include=("/scratch/out",), exclude=("/scratch",))
    assert r.offloads("/scratch/out/a") and not r.offloads("/scratch/outside")
    assert Policy.from_dict(q.to_dict()) == q


def test_policy_rejects_nonsense():
    with pytest.raises(UsageError, match="one of"):
        Policy(mode="all")
    with pytest.raises(UsageError, match="absolute"):
        Policy(include=("relative",))
    with pytest.raises(UsageError, match="/proc"):
        Policy(include=("/proc/self",))
    assert not Policy(mode="none").active


def test_paths_are_made_absolute_lexically():
    assert absolute("/a/b", "c/../d") == "/a/b/d"
    assert absolute("/a", "/x//y/.") == "/x/y"
    assert absolute("/", "..") == "/"
    assert absolute("/a", "") == "/a"


def test_records_round_trip_and_merge_in_time_order():
    a, b = accounting.Records(3, initial=1), accounting.Records(3)
    for i in range(5):  # grows past its initial size
        a.add(10 * i, 10 * i + 5, i, i, 100 + i, 4096, 0, 18, accounting.EMULATED)
    b.add(15, 16, 7, -1, 99, 4097, 9, 1, accounting.EMULATED | accounting.CHANNEL)
    rows = accounting.from_bytes(a.to_bytes())
    assert len(a) == 5 and rows.dtype == accounting.RECORD_DTYPE
    assert list(rows["trap_ns"]) == [0, 10, 20, 30, 40] and (rows["rank"] == 3).all()
    merged = accounting.from_bytes(accounting.merged(a, b))
    assert list(merged["trap_ns"]) == [0, 10, 15, 20, 30, 40]
    assert merged[2]["errno"] == 9 and merged[2]["result"] == -1
    with pytest.raises(ValueError):
        accounting.from_bytes(b"\0" * 7)


def test_protocol_carries_descriptors(tmp_path: Path):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    protocol.send(a, {"op": "x", "n": 1}, [w])
    msg, fds = protocol.recv(b)
    assert msg == {"op": "x", "n": 1} and len(fds) == 1
    os.write(fds[0], b"!")
    assert os.read(r, 1) == b"!"
    for fd in (r, w, *fds):
        os.close(fd)
    a.close()
    with pytest.raises(protocol.ProtocolError):
        protocol.recv(b)
    b.close()


def test_run_dir_must_be_private(tmp_path: Path):
    d = tmp_path / "run"
    assert spawn.prepare_run_dir(d) is True
    assert d.stat().st_mode & 0o777 == 0o700
    assert spawn.prepare_run_dir(d) is False
    d.chmod(0o755)
    with pytest.raises(OffloadError, match="0700"):
        spawn.prepare_run_dir(d)
    with pytest.raises(OffloadError, match="does not exist"):
        spawn.prepare_run_dir(tmp_path / "no" / "run")


def test_ring_layout_fits():
    assert ring.REQ.size <= ring.DONE_AT
    assert ring.DONE_AT + ring.DONE.size <= ring.SLOT
    assert ring.HDR.size <= ring.HEADER
    assert ring.ring_size(64) == ring.HEADER + 64 * ring.SLOT
    assert np.dtype(accounting.RECORD_DTYPE).itemsize == 52


def test_require_names_in_one_line_what_the_kernel_lacks(monkeypatch):
    monkeypatch.setattr(seccomp, "probe", lambda: {
        "kernel": "5.4.0", "user_notif": True, "addfd": False, "wait_killable_recv": False,
        "offload_ok": False})
    with pytest.raises(FeatureUnavailable) as caught:
        seccomp.require()
    message = str(caught.value)
    assert "\n" not in message and "5.4.0" in message
    assert "lacks wait_killable_recv, addfd" in message


def _child(setup) -> tuple[int, int]:
    """A forked child that runs `setup()` and waits: (pid, the pipe end that ends it)."""
    r, w = os.pipe()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(w)
        os.close(ready_r)
        setup()
        os.write(ready_w, b".")
        os.read(r, 1)
        os._exit(0)
    os.close(r)
    os.close(ready_w)
    os.read(ready_r, 1)
    os.close(ready_r)
    return pid, w


def _end(pid: int, w: int) -> None:
    os.close(w)
    os.waitpid(pid, 0)


def test_identity_tells_a_task_with_other_credentials_or_limits_apart():
    """The proxy serves a process only with its own identity (tracee.identity/differs)."""
    import resource

    from mckmpi.offload.tracee import differs, identity

    me = identity(os.getpid())
    children = [_child(lambda: None),
                _child(lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000)))]
    if os.geteuid() == 0:
        children.append(_child(lambda: os.setegid(65534) or os.seteuid(65534)))
    try:
        assert differs(children[0][0], me) == ""
        assert "RLIMIT_FSIZE" in differs(children[1][0], me)
        if len(children) > 2:
            assert differs(children[2][0], me)  # credentials differ (or cannot even be read)
    finally:
        for child in reversed(children):  # a later child holds the earlier ones' pipe ends
            _end(*child)
    assert "cannot be read" in differs(children[0][0], me)  # gone


def test_a_closed_standard_stream_is_the_number_a_new_descriptor_gets():
    from mckmpi.offload.tracee import Proc

    def close_stdout() -> None:
        os.close(1)

    pid, w = _child(close_stdout)
    proc = Proc(pid, 0o022, BASE)
    try:
        assert proc.std_hole(0) == 1 and proc.std_hole(1) == 1
        assert proc.std_hole(2) is None and proc.std_hole(3) is None
        assert proc.std_gap  # still a hole: checked again next time
    finally:
        proc.close()
        _end(pid, w)
    pid, w = _child(lambda: None)
    proc = Proc(pid, 0o022, BASE)
    try:
        assert proc.std_hole(0) is None and not proc.std_gap  # all open: no more checks
    finally:
        proc.close()
        _end(pid, w)


def test_the_compiled_record_is_the_record_layout():
    from mckmpi.offload import _fastpath

    assert _fastpath.RECORD_SIZE == accounting.RECORD_DTYPE.itemsize


def test_a_proxy_without_its_compiled_part_is_one_clear_line(tmp_path: Path):
    import subprocess
    import sys

    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    code = ("import sys; sys.modules['mckmpi.offload._fastpath'] = None\n"
            "from mckmpi.frontend.cli import main\n"
            f"sys.exit(main(['proxy', '--socket', {str(run / 'p.sock')!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("mckmpi: error: ")
    assert "make setup" in proc.stderr and "--interpreted" in proc.stderr
