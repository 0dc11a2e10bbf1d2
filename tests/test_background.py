"""The background noise source: confinement, its bursts and writes, and that it never stays."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mckmpi.errors import UsageError
from mckmpi.background import start_noise


def _gone(pid: int, within: float) -> bool:
    """True once `pid` no longer exists (or is a zombie nobody reaped yet)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def _cpu_ns(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def test_bursts_writes_and_confinement(tmp_path):
    cpu = min(os.sched_getaffinity(0))
    with start_noise([cpu], period_ms=10, burst_ms=3, write_bytes=700, directory=str(tmp_path)) as noise:
        status = Path(f"/proc/{noise.pid}/status").read_text()
        assert f"Cpus_allowed_list:\t{cpu}\n" in status
        assert Path(noise.path).parent == tmp_path
        assert noise.describe().endswith(f"every 10 ms on CPUs {cpu}, 700 B written per period")
        time.sleep(0.6)
        used = _cpu_ns(noise.pid)
        assert Path(noise.path).stat().st_size == 700
    stats = noise.stats
    assert stats is not None and not noise.running
    assert 40 <= stats.bursts <= 70 and stats.writes == stats.bursts
    assert stats.bytes_written == 700 * stats.writes
    assert stats.burst_ns >= stats.bursts * 3_000_000
    # About 30 % of one CPU (less when the core is shared with other work).
    assert 0.05 * stats.wall_ns < stats.cpu_ns < 0.6 * stats.wall_ns
    assert used > 0
    assert not Path(noise.path).exists() and _gone(noise.pid, 1)


def test_unconfined_noise_keeps_the_starters_cpus():
    noise = start_noise(None, period_ms=20, burst_ms=1, write_bytes=0)
    try:
        mine = Path("/proc/self/status").read_text().split("Cpus_allowed_list:")[1].split()[0]
        theirs = Path(f"/proc/{noise.pid}/status").read_text().split("Cpus_allowed_list:")[1].split()[0]
        assert theirs == mine
    finally:
        stats = noise.stop()
    assert stats is not None and stats.writes == 0 and noise.stop() is stats


def test_dies_with_a_starter_that_is_killed(tmp_path):
    code = ("import sys, time\nfrom mckmpi.background import start_noise\n"
            f"n = start_noise(None, 10, 1, 64, directory={str(tmp_path)!r})\n"
            "print(n.pid, n.path, flush=True)\ntime.sleep(60)\n")
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) as starter:
        try:
            pid, path = starter.stdout.readline().split()
            assert Path(path).exists()
            starter.send_signal(signal.SIGKILL)
            starter.wait(timeout=10)
            assert _gone(int(pid), 3), "the noise process outlived its starter"
            assert not list(tmp_path.iterdir())
        finally:
            starter.kill()


@pytest.mark.parametrize("kwargs,message", [
    (dict(cpus=None, period_ms=10, burst_ms=10, write_bytes=0), "shorter than the period"),
    (dict(cpus=None, period_ms=0, burst_ms=0, write_bytes=0), "period must be positive"),
    (dict(cpus=None, period_ms=10, burst_ms=1, write_bytes=-1), "must not be negative"),
    (dict(cpus=[], period_ms=10, burst_ms=1, write_bytes=0), "list is empty"),
    (dict(cpus=[4096], period_ms=10, burst_ms=1, write_bytes=0), "outside this process's CPUs"),
])
def test_bad_parameters_are_refused_before_starting(kwargs, message):
    with pytest.raises(UsageError, match=message):
        start_noise(**kwargs)


def test_a_child_that_cannot_start_is_reported(tmp_path):
    with pytest.raises(UsageError, match="did not start"):
        start_noise(None, 10, 1, 64, directory=str(tmp_path / "missing"))
