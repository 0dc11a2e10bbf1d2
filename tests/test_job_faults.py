"""Faults that end a job under mpiexec: one line, a non-zero status, nothing left behind.

Each job runs with a tag and a TMPDIR of its own (the `leftovers` fixture), so after the
ending the test can ask whether any process, socket, directory, memfd or cgroup of that
job remains.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixtures import APPS, ROOT

#: A rank that does offloaded file I/O until it is stopped (about 20 s at most).
BUSY_APP = """
import os, sys, time
path = os.path.join(sys.argv[1], f"busy-{os.getpid()}")
open(os.path.join(sys.argv[1], "started"), "a").close()
for i in range(2000):
    with open(path, "w") as f:
        f.write("x" * 4096)
    os.stat(path)
    time.sleep(0.01)
os.unlink(path)
"""

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs Linux /proc")


def _start(leftovers, tmp_path: Path, *args: str, n: int = 2) -> subprocess.Popen:
    cmd = ["mpiexec", "-n", str(n), "--bind-to", "none", "--oversubscribe", sys.executable,
           "-m", "mckmpi", "run", "--oversubscribe", "--out", str(tmp_path / "out"), *args]
    env = dict(leftovers.env, PYTHONPATH=str(ROOT))
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=tmp_path, start_new_session=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"the job did not end within {timeout} s: {err[-2000:]}")
    return proc.returncode, err


def _busy(tmp_path: Path) -> Path:
    app = tmp_path / "busy.py"
    app.write_text(BUSY_APP)
    return app


def _proxy_pids(tag: str) -> list[int]:
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as fh:
                    cmd = fh.read().split(b"\0")
            except OSError:
                continue
            if b"proxy" in cmd and any(tag.encode() in part for part in cmd):
                pids.append(int(entry.name))
    return pids


def _no_noise(err: str) -> None:
    assert "Traceback" not in err, err
    assert "Errno 38" not in err and "Function not implemented" not in err, err
    assert "MPI_ABORT was invoked" not in err, err
    assert "mckmpi: error: rank" not in err.replace("mckmpi: error: rank", "", 1), err
    assert "mckmpi: rank" not in err, err  # no doubled prefix


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_mpiexec_ends_with_one_line(tmp_path, leftovers, signum):
    """A cancelled job (scancel, Ctrl-C, the time limit): one line, a non-zero status, no
    proxy, socket or directory left."""
    proc = _start(leftovers, tmp_path, "--mode", "lwk", "--", str(_busy(tmp_path)), str(tmp_path))
    _wait_for(tmp_path / "started", proc)
    time.sleep(1.0)  # offloaded I/O in full swing
    os.kill(proc.pid, signum)
    code, err = _finish(proc)
    assert code != 0
    lines = [line for line in err.splitlines() if line.startswith("mckmpi:")]
    # said at once; the run file's line follows when it was finished before mpiexec's SIGKILL
    assert lines[0] == "mckmpi: error: job terminated by SIGTERM", err
    assert len(lines) == 1 or (len(lines) == 2 and "(ended by SIGTERM)" in lines[1]), err
    _no_noise(err)
    leftovers.check()


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_a_lost_proxy_ends_the_job_with_one_line(tmp_path, leftovers, signum):
    """The proxy killed, or terminated on its own: the ranks never see ENOSYS, the job ends
    with one line of the node's rank 0."""
    proc = _start(leftovers, tmp_path, "--mode", "lwk", "--", str(_busy(tmp_path)), str(tmp_path))
    _wait_for(tmp_path / "started", proc)
    time.sleep(1.0)
    (pid,) = _proxy_pids(leftovers.tag)
    os.kill(pid, signum)
    code, err = _finish(proc)
    assert code != 0
    lines = [line for line in err.splitlines() if line.startswith("mckmpi: error:")]
    assert len(lines) == 1 and "the offload proxy" in lines[0], err
    _no_noise(err)
    leftovers.check()


def test_an_aborted_checkpoint_run_leaves_no_temporary_directory(tmp_path, leftovers):
    proc = _start(leftovers, tmp_path, "--mode", "lwk", "--",
                  str(APPS / "checkpoint.py"), "--iterations", "20000", "--every", "10",
                  "--elements", "100000")
    deadline = time.monotonic() + 60
    while not list(leftovers.tmpdir.glob("mckmpi-checkpoint-*/ckpt-*")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)
    code, err = _finish(proc)
    assert code != 0 and "SIGTERM" in err, err
    leftovers.check()


def test_a_normal_lwk_run_leaves_nothing(tmp_path, leftovers):
    proc = _start(leftovers, tmp_path, "--mode", "lwk", "--", str(APPS / "fwq.py"),
                  "--samples", "50", "--quantum-us", "100")
    code, err = _finish(proc)
    assert code == 0, err
    leftovers.check()


def test_a_runtime_directory_of_another_user_is_not_used(tmp_path, leftovers):
    """Another user created TMPDIR/mckmpi-UID first (for root: /tmp/mckmpi-0): the job
    warns in one line and uses a private directory of its own."""
    if os.geteuid() != 0:
        pytest.skip("creating a directory owned by another user needs root")
    squatted = leftovers.tmpdir / f"mckmpi-{os.geteuid()}"
    squatted.mkdir(mode=0o777)
    os.chown(squatted, 65534, 65534)
    proc = _start(leftovers, tmp_path, "--mode", "lwk", "--", str(APPS / "fwq.py"),
                  "--samples", "50", "--quantum-us", "100")
    code, err = _finish(proc)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("mckmpi: warning:")]
    assert len(warnings) == 1 and "belongs to uid 65534" in warnings[0], err
    assert not any(squatted.iterdir())  # nothing of ours went into the other user's directory
    squatted.rmdir()
    leftovers.check()
