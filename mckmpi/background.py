"""A background noise source for studies: a daemon-like process that periodically burns CPU
and writes a little to a file, like the monitoring and logging daemons of an untuned node.

`start_noise(cpus, period_ms, burst_ms, write_bytes)` starts it (confined to `cpus` with
`sched_setaffinity`, or free to run anywhere with `cpus=None`) and returns once it runs;
`handle.stop()` ends it and returns what it did. Every `period_ms` on a fixed schedule it
busy-spins for `burst_ms`, then rewrites `write_bytes` at the start of its own temporary
file (optionally with fsync), then sleeps.

It never outlives its starter: it is the starter's child in its own session (terminal
signals do not reach it), it asks the kernel for SIGTERM when its parent dies
(PR_SET_PDEATHSIG) and checks its parent on every period as well, the starter stops it at
exit, and on SIGTERM it removes its file before leaving. Run standalone with
``python -m mckmpi.background --cpus 0 --period-ms 10 --burst-ms 2`` (until SIGTERM or Ctrl-C).
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from mckmpi.errors import UsageError
from mckmpi.utility.units import format_cpulist, parse_cpulist

PR_SET_PDEATHSIG = 1
READY = "ready"


@dataclass(frozen=True)
class NoiseStats:
    """What the noise process did (its own account, printed when it stops)."""

    bursts: int
    burst_ns: int      # wall time spent spinning
    cpu_ns: int        # CPU time the process used (user + system)
    writes: int
    bytes_written: int
    late: int          # periods that started late (the process was not running on time)
    wall_ns: int


class NoiseSource:
    """Handle of a running noise process; `stop()` ends it (idempotent)."""

    def __init__(self, proc: subprocess.Popen, cpus: tuple[int, ...] | None, path: str,
                 period_ms: float, burst_ms: float, write_bytes: int) -> None:
        self._proc = proc
        self.pid = proc.pid
        self.cpus = cpus
        self.path = path
        self.period_ms = period_ms
        self.burst_ms = burst_ms
        self.write_bytes = write_bytes
        self.stats: NoiseStats | None = None
        self._stopped = False
        atexit.register(self.stop)

    def __enter__(self) -> NoiseSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._proc.poll() is None

    def stop(self, timeout: float = 5.0) -> NoiseStats | None:
        """SIGTERM, wait, SIGKILL if it does not leave; returns its statistics."""
        if self._stopped:
            return self.stats
        self._stopped = True
        atexit.unregister(self.stop)
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self._proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            out, _ = self._proc.communicate()
        for line in (out or "").splitlines():
            if line.startswith("{"):
                self.stats = NoiseStats(**json.loads(line))
        Path(self.path).unlink(missing_ok=True)  # if it was killed before cleaning up
        return self.stats

    def describe(self) -> str:
        where = "any CPU" if self.cpus is None else f"CPUs {format_cpulist(self.cpus)}"
        return (f"noise pid {self.pid}: {self.burst_ms:g} ms of CPU every {self.period_ms:g} ms "
                f"on {where}, {self.write_bytes} B written per period")


def _check(cpus: Iterable[int] | None, period_ms: float, burst_ms: float,
           write_bytes: int) -> tuple[int, ...] | None:
    if not period_ms > 0:
        raise UsageError(f"noise period must be positive, got {period_ms} ms")
    if not 0 <= burst_ms < period_ms:
        raise UsageError(f"noise burst must be at least 0 and shorter than the period "
                         f"({period_ms} ms), got {burst_ms} ms")
    if write_bytes < 0:
        raise UsageError(f"noise write size must not be negative, got {write_bytes}")
    if cpus is None:
        return None
    chosen = tuple(sorted(set(cpus)))
    if not chosen:
        raise UsageError("noise CPUs: the list is empty (use None to run anywhere)")
    outside = sorted(set(chosen) - os.sched_getaffinity(0))
    if outside:
        raise UsageError(f"noise CPUs {format_cpulist(outside)} are outside this process's "
                         f"CPUs {format_cpulist(os.sched_getaffinity(0))}")
    return chosen


def start_noise(cpus: Iterable[int] | None, period_ms: float = 10.0, burst_ms: float = 2.0,
                write_bytes: int = 4096, *, fsync: bool = False, directory: str | None = None,
                timeout: float = 10.0) -> NoiseSource:
    """Start the noise process and return once it runs (pinned and with its file open).

    Call it from the thread that outlives the noise: the kernel's parent-death signal is tied
    to the thread that started the child.
    """
    chosen = _check(cpus, period_ms, burst_ms, write_bytes)
    cmd = [sys.executable, "-m", "mckmpi.background", "--period-ms", repr(period_ms),
           "--burst-ms", repr(burst_ms), "--write-bytes", str(write_bytes),
           "--parent", str(os.getpid())]
    if chosen is not None:
        cmd += ["--cpus", format_cpulist(chosen)]
    if fsync:
        cmd.append("--fsync")
    if directory is not None:
        cmd += ["--dir", directory]
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    line = _read_line(proc, timeout)
    if not line.startswith(READY + " "):
        proc.kill()
        _, err = proc.communicate()
        reason = (err or "").strip().splitlines()[-1:] or [f"no sign of life within {timeout} s"]
        raise UsageError(f"the noise process did not start: {reason[0]}")
    return NoiseSource(proc, chosen, line.split(" ", 1)[1], period_ms, burst_ms, write_bytes)


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    """The child's first line, or '' if it says nothing within `timeout`."""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            return ""
    return proc.stdout.readline().strip()


# --- the noise process itself ------------------------------------------------------------

class _Stop(Exception):
    pass


def _on_term(signum: int, frame: object) -> None:
    raise _Stop


def _die_with_parent(parent: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request took effect
        raise _Stop


def run(cpus: tuple[int, ...] | None, period_ms: float, burst_ms: float, write_bytes: int,
        fsync: bool, directory: str | None, parent: int | None) -> NoiseStats:
    """The noise loop, until SIGTERM/SIGINT or the parent's death."""
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, _on_term)
    t_start = time.monotonic_ns()
    cpu_start = time.process_time_ns()
    bursts = burst_ns = writes = written = late = 0
    fd, path = -1, ""
    try:
        if parent is not None:
            _die_with_parent(parent)
        if cpus is not None:
            os.sched_setaffinity(0, cpus)
        fd, path = tempfile.mkstemp(prefix="mckmpi-noise-", dir=directory)
        payload = bytes(range(256)) * (write_bytes // 256) + bytes(write_bytes % 256)
        print(f"{READY} {path}", flush=True)
        period, burst = round(period_ms * 1e6), round(burst_ms * 1e6)
        clock = time.monotonic_ns
        due = clock()
        while True:
            now = clock()
            if now - due > period // 2:
                late += 1
                due = now  # do not try to catch up: a daemon that was held back just goes on
            end = now + burst
            while now < end:
                now = clock()
            bursts += 1
            burst_ns += now - (end - burst)
            if write_bytes:
                written += os.pwrite(fd, payload, 0)
                writes += 1
                if fsync:
                    os.fsync(fd)
            if parent is not None and os.getppid() != parent:
                break
            due += period
            pause = due - clock()
            if pause > 0:
                time.sleep(pause / 1e9)
    except _Stop:
        pass
    finally:
        if fd >= 0:
            os.close(fd)
            os.unlink(path)
    return NoiseStats(bursts, burst_ns, time.process_time_ns() - cpu_start, writes, written, late,
                      time.monotonic_ns() - t_start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mckmpi.background", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpus", default=None, help="CPU list to confine the noise to [anywhere]")
    p.add_argument("--period-ms", type=float, default=10.0, help="period of the bursts [10]")
    p.add_argument("--burst-ms", type=float, default=2.0, help="CPU burst per period [2]")
    p.add_argument("--write-bytes", type=int, default=4096, help="bytes written per period [4096]")
    p.add_argument("--fsync", action="store_true", help="fsync after every write")
    p.add_argument("--dir", default=None, help="directory of the noise file [the temp directory]")
    p.add_argument("--parent", type=int, default=None, help="end when this process is gone")
    args = p.parse_args(argv)
    try:
        cpus = _check(None if args.cpus is None else parse_cpulist(args.cpus), args.period_ms,
                      args.burst_ms, args.write_bytes)
    except UsageError as exc:
        print(f"{p.prog}: error: {exc}", file=sys.stderr)
        return 2
    stats = run(cpus, args.period_ms, args.burst_ms, args.write_bytes, args.fsync, args.dir,
                args.parent)
    print(json.dumps(stats.__dict__), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
