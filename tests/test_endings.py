"""Every ending of a job leaves a run file that says how it ended and holds what was taken.

Jobs run under mpiexec with two ranks; the apps stream their samples through the tracer
(`tracer.stream`), as FWQ does. A stamp app stores, as each sample, the CLOCK_MONOTONIC
time it was taken, so a test can tell exactly how far before a kill the file reaches.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from fixtures import APPS, job_tag, mckmpi, mpirun, tagged, tagged_processes

from mckmpi.jobs.launchers import Job
from mckmpi.trace.reader import RunFileError, open_run
from mckmpi.trace.spool import read_spool

FWQ = str(APPS / "fwq.py")
FLUSH_S = 0.2

STAMPS = textwrap.dedent("""
    import os, sys, time
    import numpy as np
    from mpi4py import MPI
    import mckmpi

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    out, n, exit_rank = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    how = sys.argv[4] if len(sys.argv) > 4 else "exit"
    stamps = np.zeros(n, dtype=np.int64)
    stream = mckmpi.context().tracer.stream("noise", "stamps_ns", stamps, units="ns")
    with open(os.path.join(out, f"pid-{rank}"), "w") as fh:   # an offloaded open and write
        fh.write(str(os.getpid()))
    for i in range(n):
        stamps[i] = time.monotonic_ns()
        stream.filled = i + 1
        time.sleep(0.002)
    if rank == exit_rank:
        sys.exit(3) if how == "exit" else comm.Abort(7)
    comm.Barrier()
""")


def _start(tmp_path: Path, app: list[str], oversubscribe: bool = False,
           **options: str) -> subprocess.Popen:
    """A 2-rank job in its own session (so the test can kill all of it), not waited for."""
    launch = Job(tuple(app), 2, {"trace_flush": FLUSH_S, "out": str(tmp_path / "out"),
                                 **options}, oversubscribe=oversubscribe).render("mpiexec")
    return subprocess.Popen(launch.argv, env=launch.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _stamps_app(tmp_path: Path, n: int, exit_rank: int = -1, how: str = "exit") -> list[str]:
    """The stamp app with `n` samples; rank `exit_rank` then exits 3 (or, with `how` =
    "abort", calls MPI_Abort with errorcode 7)."""
    app = tmp_path / "stamps.py"
    app.write_text(STAMPS)
    return [str(app), str(tmp_path), str(n), str(exit_rank), how]


def _wait(predicate, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the job ended early:\n{proc.stderr.read()[-2000:]}")
        time.sleep(0.02)
    raise AssertionError("timed out waiting for the job")


def _one(tmp_path: Path, pattern: str) -> Path:
    found = sorted((tmp_path / "out").glob(pattern))
    assert len(found) == 1, found
    return found[0]


def _reap(proc: subprocess.Popen, timeout: float = 60) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _pids(tmp_path: Path) -> list[int]:
    return [int((tmp_path / f"pid-{r}").read_text()) for r in range(2)]


@pytest.mark.offload
def test_kill_9_of_the_whole_job_loses_at_most_the_last_flush(tmp_path):
    proc = _start(tmp_path, _stamps_app(tmp_path, 100_000), offload="io")
    _wait(lambda: all((tmp_path / f"pid-{r}").exists() for r in range(2)), proc, 60)
    time.sleep(1.5)  # sampling for a while, several flushes
    ranks = _pids(tmp_path)
    killed_at = time.monotonic_ns()
    os.killpg(proc.pid, signal.SIGKILL)  # mpiexec ...
    for pid in ranks:  # ... and every rank, wherever it is
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _reap(proc)
    partial = _one(tmp_path, "*.h5.partial")
    assert not list((tmp_path / "out").glob("*.h5"))
    with pytest.raises(RunFileError, match="incomplete"):
        open_run(partial)
    with open_run(partial, allow_incomplete=True) as run:
        assert run.partial and "ending killed" in run.note
        for rank in range(2):
            n = run.length("noise/stamps_ns", rank)
            last = int(run.read("noise/stamps_ns", (rank, n - 1)))
            assert n > 100
            # Only the tail since the last flush is lost (plus one sleep of the app).
            assert killed_at - last < (FLUSH_S + 0.5) * 1e9, (rank, (killed_at - last) / 1e9)
            # The offloaded open and write of the pid file streamed too.
            assert b"openat" in set(run.table("offload/calls", rank)["call"].tolist())
    report = mckmpi("report", str(partial), timeout=60)
    assert report.returncode == 0, report.stderr
    said = [line for line in report.stderr.splitlines() if line]
    assert len(said) == 1 and "partial run file" in said[0] and "ending killed" in said[0]
    assert "noise/stamps_ns" in report.stdout


def _spooled_rows(tmp_path: Path, key: str) -> dict[int, int]:
    """Rows of `key` each rank's spool holds now."""
    found = {}
    for spool in (tmp_path / "out").glob("*.h5.partial.d/rank-*.spool"):
        rec = read_spool(spool).records.get(key)
        found[int(spool.stem.split("-")[1])] = 0 if rec is None else rec[1].size
    return found


def _kill_9_when_streaming(tmp_path: Path, proc: subprocess.Popen, key: str) -> int:
    """Once both ranks' spools hold `key`, wait a few flushes and SIGKILL mpiexec and every
    rank (their pids from the run file's header); the kill's time (CLOCK_MONOTONIC ns)."""
    _wait(lambda: len(rows := _spooled_rows(tmp_path, key)) == 2 and min(rows.values()) > 0,
          proc, 60)
    time.sleep(1.5)
    with h5py.File(_one(tmp_path, "*.h5.partial"), "r") as header:
        ranks = [int(pid) for pid in header["ranks"]["pid"]]
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in ranks:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    killed_at = time.monotonic_ns()  # every process of the job is gone
    _reap(proc)
    return killed_at


def test_kill_9_keeps_an_apps_streamed_arrays_but_the_last_flush(tmp_path):
    interval_ns = 1_000_000
    proc = _start(tmp_path, [str(APPS / "ftq.py"), "--intervals", "200000",
                             "--interval-us", str(interval_ns // 1000)])
    killed_at = _kill_9_when_streaming(tmp_path, proc, "noise/ftq_counts")
    with open_run(_one(tmp_path, "*.h5.partial"), allow_incomplete=True) as run:
        assert run.partial and "ending killed" in run.note
        for rank in range(2):
            n = run.length("noise/ftq_counts", rank)
            assert n == run.length("noise/ftq_start_ns", rank) and n > 500, n
            starts = run.read("noise/ftq_start_ns", rank)[:n]
            assert np.all(np.diff(starts) == interval_ns) and run.read(
                "noise/ftq_counts", rank)[:n].sum() > 0
            # The intervals that ended before the last flush are all there.
            lost_s = (killed_at - (int(starts[-1]) + interval_ns)) / 1e9
            assert lost_s < FLUSH_S + 0.5, (rank, lost_s)


@pytest.mark.parametrize("app,key", [
    (["stencil.py", "--local", "64x64", "--iterations", "200000"], "app/comm_ns"),
    (["cg.py", "--local", "64", "--tol", "1e-300", "--max-iter", "100000"], "app/halo_ns"),
    (["allreduce.py", "--sizes", "8", "--iterations", "1000000", "--work-us", "20"],
     "app/allreduce"),
    (["detour.py", "--duration-s", "600"], "noise/detours"),
], ids=["stencil", "cg", "allreduce", "detour"])
def test_kill_9_keeps_every_apps_series_and_tables(tmp_path, app, key):
    proc = _start(tmp_path, [str(APPS / app[0]), *app[1:]])
    _kill_9_when_streaming(tmp_path, proc, key)
    with open_run(_one(tmp_path, "*.h5.partial"), allow_incomplete=True) as run:
        assert run.partial and "ending killed" in run.note
        for rank in range(2):
            rows = len(run.table(key, rank)) if run.kind(key) == "table" \
                else run.length(key, rank)
            assert rows > 0, (key, rank)


@pytest.mark.offload
def test_kill_9_keeps_the_runtime_counters_of_the_last_flush(tmp_path):
    proc = _start(tmp_path, [FWQ, "--samples", "200000", "--quantum-us", "500"],
                  oversubscribe=True, mode="lwk", mem="64M")
    killed_at = _kill_9_when_streaming(tmp_path, proc, "scheduler/voluntary_switches")
    with open_run(_one(tmp_path, "*.h5.partial"), allow_incomplete=True) as run:
        assert run.partial and "ending killed" in run.note
        for group in ("memory", "scheduler"):
            taken = run.scalars(f"{group}/snapshot_ns")
            for rank in range(2):
                lost_s = (killed_at - int(taken[rank])) / 1e9
                assert 0 <= lost_s < FLUSH_S + 0.5, (group, rank, lost_s)
        assert set(run.members("memory")) >= {"minflt", "majflt", "in_use", "peak", "size"}
        assert set(run.members("scheduler")) >= {"voluntary_switches", "involuntary_switches",
                                                 "switches", "safepoints"}
        # Sampled during the app: the main thread was switched out while it sampled.
        switches = run.scalars("scheduler/voluntary_switches") + run.scalars(
            "scheduler/involuntary_switches")
        assert np.all(switches > 0), switches
        assert np.all(run.scalars("memory/size") >= 64 << 20)


def test_sigterm_finishes_the_run_file_with_the_ending(tmp_path):
    proc = _start(tmp_path, [FWQ, "--samples", "100000", "--quantum-us", "500"])
    _wait(lambda: any((tmp_path / "out").glob("*.partial.d/rank-000001.spool"))
          and list((tmp_path / "out").glob("*.partial.d/rank-000001.spool"))[0].stat().st_size
          > 4096, proc, 60)
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGTERM)  # mpiexec forwards it to every rank
    _, err = _reap(proc)
    assert proc.returncode != 0
    path = _one(tmp_path, "*.h5")
    assert not list((tmp_path / "out").glob("*.partial*")), "left-overs beside a complete file"
    with open_run(path) as run:
        a = run.attrs
        assert a["complete"] and a["ending"] == "signal" and a["signal"] == "SIGTERM"
        assert a["exit_status"] == 128 + signal.SIGTERM
        for rank in range(2):
            assert run.length("noise/fwq_ns", rank) > 100
    report = mckmpi("report", str(path), timeout=60)
    assert report.returncode == 0 and "ending     signal SIGTERM" in report.stdout


@pytest.mark.offload
def test_a_rank_that_exits_3_leaves_its_samples_calls_and_ending(tmp_path):
    proc = _start(tmp_path, _stamps_app(tmp_path, 200, exit_rank=1), offload="io")
    _, err = _reap(proc, timeout=120)
    assert proc.returncode == 3, err[-2000:]
    partial = _one(tmp_path, "*.h5.partial")
    with open_run(partial, allow_incomplete=True) as run:
        a = run.attrs
        assert (a["ending"], a["exit_status"], a["ending_rank"]) == ("exit", 3, 1), run.note
        assert "rank 1 exited with status 3" in a["error"]
        assert run.length("noise/stamps_ns", 1) == 200
        calls = run.table("offload/calls", rank=1)
        assert b"openat" in set(calls["call"].tolist()), calls
    report = mckmpi("report", str(partial), timeout=60)
    assert report.returncode == 0, report.stderr
    assert "ending exit on rank 1" in report.stderr


@pytest.mark.parametrize("options", [
    {"mode": "linux"},
    pytest.param({"mode": "lwk", "mem": "64M"}, marks=pytest.mark.offload),
], ids=["linux", "lwk"])
def test_an_apps_mpi_abort_is_recorded_with_its_errorcode_and_rank(tmp_path, options):
    proc = _start(tmp_path, _stamps_app(tmp_path, 200, exit_rank=1, how="abort"),
                  oversubscribe=options["mode"] == "lwk", **options)
    _, err = _reap(proc, timeout=120)
    assert proc.returncode == 7, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("mckmpi: error:")]
    assert "mckmpi: error: rank 1 called MPI_Abort with errorcode 7" in lines, err[-2000:]
    partial = _one(tmp_path, "*.h5.partial")
    with open_run(partial, allow_incomplete=True) as run:
        a = run.attrs
        assert (a["ending"], a["exit_status"], a["ending_rank"]) == ("aborted", 7, 1), run.note
        assert a["error"] == "rank 1 called MPI_Abort with errorcode 7"
        # The aborting rank flushed everything it had recorded before the abort.
        assert run.length("noise/stamps_ns", 1) == 200
    report = mckmpi("report", str(partial), timeout=60)
    assert report.returncode == 0, report.stderr
    assert "ending aborted on rank 1 (rank 1 called MPI_Abort with errorcode 7)" in report.stderr


@pytest.fixture
def full_disk(tmp_path):
    """A 512 KiB tmpfs: the header and the spools fit, a few MiB of data do not."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)],
                          capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


BIG = textwrap.dedent("""
    import numpy as np
    import mckmpi
    # 2 MiB per rank that gzip cannot shrink
    mckmpi.context().tracer.array("noise", "big", np.random.default_rng().random(1 << 18))
""")


@pytest.mark.parametrize("writer", ["parallel", "gather"])
def test_a_full_disk_is_one_line_with_errno_and_no_hang(tmp_path, full_disk, writer):
    app = tmp_path / "big.py"
    app.write_text(BIG)
    tag = job_tag()
    started = time.monotonic()
    proc = mpirun(2, "run", "--trace-flush", "0", "--trace-writer", writer, "--out",
                  str(full_disk), "--", str(app), timeout=60,
                  env=Job(("x",), env=tag).render("local").env)
    took = time.monotonic() - started
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("mckmpi: error:")]
    assert proc.returncode == 74, proc.stderr[-2000:]
    assert len(lines) == 1 and "ENOSPC" in lines[0] and str(full_disk) in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert took < 10 + 10, took  # 10 s to end, plus the start-up of two interpreters
    assert tagged_processes(tag) == [], "processes of the job outlived it"
    partial = next(full_disk.glob("*.h5.partial"))
    with open_run(partial, allow_incomplete=True) as run:
        assert run.partial and run.world_size == 2
    assert os.strerror(errno.ENOSPC) in lines[0]


def test_a_disk_that_fills_while_streaming_is_one_line_and_a_recorded_ending(tmp_path,
                                                                             full_disk):
    tag = job_tag()
    started = time.monotonic()
    # 10 us samples: each rank streams about 0.8 MB/s, so the 512 KiB fill within a second.
    proc = mpirun(2, "run", "--trace-flush", str(FLUSH_S), "--out", str(full_disk), "--", FWQ,
                  "--samples", "5000000", "--quantum-us", "10", timeout=60,
                  env=Job(("x",), env=tag).render("local").env)
    took = time.monotonic() - started
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("mckmpi: error:")]
    assert proc.returncode == 74, proc.stderr[-2000:]
    assert len(lines) == 1 and "ENOSPC" in lines[0] and str(full_disk) in lines[0], lines
    assert "Traceback" not in proc.stderr
    assert took < 10 + 10, took  # 10 s to end, plus the start-up of two interpreters
    assert tagged_processes(tag) == [], "processes of the job outlived it"
    partial = next(full_disk.glob("*.h5.partial"))
    with open_run(partial, allow_incomplete=True) as run:
        a = run.attrs
        # No room for the ending in the spool: it is in the space reserved for it.
        assert a["ending"] == "io-error" and "ENOSPC" in a["error"], run.note
        assert min(run.length("noise/fwq_ns", r) for r in range(2)) > 1000


@pytest.mark.offload
@pytest.mark.parametrize("layout", [
    ("1", ("--mode", "lwk", "--mem", "64M"), "--async"),  # the asynchronous offload channel
    ("2", ("--mode", "linux"), "--async"),                # a worker thread
    ("2", ("--mode", "linux"), ""),                       # synchronous writes
], ids=["lwk-channel", "linux-thread", "linux-sync"])
def test_a_full_checkpoint_target_is_the_real_enospc(tmp_path, full_disk, layout):
    n, run_args, mode = layout
    with open(full_disk / "filler", "wb") as fh:  # the disk is full before the first checkpoint
        try:
            while True:
                fh.write(bytes(64 << 10))
                fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    started = time.monotonic()
    tag = job_tag()
    proc = mpirun(int(n), "run", *run_args, "--out", str(tmp_path / "out"), "--",
                  str(APPS / "checkpoint.py"), "--elements", "20000", "--iterations",
                  "6", "--every", "2", "--dir", str(full_disk), *filter(None, [mode]),
                  timeout=60, env=Job(("x",), env=tag).render("local").env)
    assert time.monotonic() - started < 10 + 10  # 10 s, plus starting the interpreters
    lines = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert proc.returncode == 74, proc.stderr[-3000:]
    assert lines and all("[Errno 28] No space left on device" in ln for ln in lines), lines
    assert "GreenletExit" not in proc.stderr and "Traceback" not in proc.stderr
    with open_run(next((tmp_path / "out").glob("*.h5.partial")), allow_incomplete=True) as run:
        assert (run.attrs["ending"], run.attrs["exit_status"]) == ("exit", 74)
    assert tagged_processes(tag) == [], "processes of the job (ranks, proxy) outlived it"


def test_a_rank_killed_mid_run_is_named(tmp_path):
    proc = _start(tmp_path, _stamps_app(tmp_path, 100_000))
    _wait(lambda: all((tmp_path / f"pid-{r}").exists() for r in range(2)), proc, 60)
    time.sleep(1)
    os.kill(_pids(tmp_path)[1], signal.SIGKILL)  # mpiexec then ends rank 0
    _reap(proc)
    assert proc.returncode != 0
    with open_run(_one(tmp_path, "*.h5.partial"), allow_incomplete=True) as run:
        a = run.attrs
        assert (a["ending"], a["ending_rank"]) == ("killed", 1), run.note
        assert "rank 1 recorded no ending" in a["error"]
        assert run.length("noise/stamps_ns", 1) > 100 and run.length("noise/stamps_ns", 0) > 100


def _tagged_pids(tag: dict[str, str], word: str) -> list[int]:
    """Pids of live processes of the tagged job with `word` as an argument."""
    return [pid for pid, argv in tagged(tag).items() if word in argv]


@pytest.mark.offload
def test_a_killed_proxy_is_the_recorded_ending(tmp_path):
    tag = job_tag()
    launch = Job(tuple(_stamps_app(tmp_path, 100_000)), 1,
                 {"mode": "lwk", "mem": "64M", "trace_flush": FLUSH_S,
                  "out": str(tmp_path / "out")}, env=tag).render("mpiexec")
    proc = subprocess.Popen(launch.argv, env=launch.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait(lambda: (tmp_path / "pid-0").exists(), proc, 60)
    time.sleep(0.5)
    (proxy,) = _tagged_pids(tag, "proxy")
    os.kill(proxy, signal.SIGKILL)
    _, err = _reap(proc)
    assert proc.returncode == 70, err[-2000:]
    with open_run(_one(tmp_path, "*.h5.partial"), allow_incomplete=True) as run:
        a = run.attrs
        assert (a["ending"], a["ending_rank"], a["exit_status"]) == ("proxy", 0, 70), run.note
        assert "proxy" in a["error"] and run.length("noise/stamps_ns", 0) > 10
    assert tagged_processes(tag) == []


def test_a_run_file_is_never_overwritten(tmp_path):
    app = tmp_path / "nothing.py"
    app.write_text("")
    out = tmp_path / "run.h5"
    first = mpirun(2, "run", "--out", str(out), "--", str(app), timeout=60)
    assert first.returncode == 0, first.stderr
    before = out.read_bytes()
    second = mpirun(2, "run", "--out", str(out), "--", str(app), timeout=60)
    lines = [ln for ln in second.stderr.splitlines() if ln.startswith("mckmpi: error:")]
    # found before the job starts: a usage error (choose another --out), not an I/O failure
    assert second.returncode == 2 and len(lines) == 1, second.stderr
    assert "exists: run files are never overwritten" in lines[0]
    assert out.read_bytes() == before and not list(tmp_path.glob("run.h5.partial*"))
