"""Streaming run files in one process: the spool, its replay, recovery and the final rename.

The job-level proofs (kill -9, signals, Slurm) are in test_endings.py; here the writer runs on
MPI.COMM_SELF, so each step can be stopped where a killed job would stop.
"""

from __future__ import annotations

import errno
import gc
import os
import time

import h5py
import numpy as np
import pytest

from mckmpi.errors import StorageError
from mckmpi.trace import writer
from mckmpi.trace.reader import RunFileError, open_run
from mckmpi.trace.schema import RANKS_DTYPE
from mckmpi.trace.spool import SpoolWriter, read_spool, spool_dir, spool_path
from mckmpi.trace.tracer import Tracer

ROOT = {"mode": "linux", "world_size": 1, "nnodes": 1, "app": "apps/x.py", "app_args": "",
        "created": "2026-01-01T00:00:00", "launcher": "singleton", "slurm_job_id": ""}


def _tracer() -> Tracer:
    t = Tracer()
    row = np.zeros((), dtype=RANKS_DTYPE)
    row["host"] = b"h"
    t.scalar("", "ranks", row)
    return t


def _start(tmp_path, t: Tracer, flush_s: float = 0.05) -> writer.RunFile:
    from mpi4py import MPI

    return writer.RunFile.start(MPI.COMM_SELF, tmp_path / "r.h5", t, dict(ROOT), {"python": "3"},
                                method="gather", flush_s=flush_s)


def _wait_spooled(run: writer.RunFile, key: str, rows: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sent = run.streamer.sent.get(key)
        if sent is not None and sent[1] >= rows:
            return
        time.sleep(0.01)
    raise AssertionError(f"{key} never reached {rows} rows in the spool")


def test_spool_replay_stops_at_a_torn_frame(tmp_path):
    sp = SpoolWriter(tmp_path / "s")
    sp.data("noise/x", "array", np.arange(3, dtype=np.int64), 0, 3, {"": "ns"}, True)
    sp.data("noise/x", "array", np.arange(3, 5, dtype=np.int64), 3, 5, {"": "ns"}, True)
    sp.frame({"type": "ending", "ending": "normal"})
    sp.data("noise/x", "array", np.arange(5, 9, dtype=np.int64), 5, 9, {"": "ns"}, True)
    sp.close()
    raw = (tmp_path / "s").read_bytes()
    (tmp_path / "s").write_bytes(raw[:-5])  # killed in the middle of the last write
    got = read_spool(tmp_path / "s")
    assert got.torn and got.ending == {"ending": "normal"}
    kind, data, units, stream = got.records["noise/x"]
    assert (kind, units, stream) == ("array", {"": "ns"}, True)
    assert data.tolist() == [0, 1, 2, 3, 4]


def test_spool_name_is_never_reused(tmp_path):
    SpoolWriter(tmp_path / "s").close()
    with pytest.raises(FileExistsError):
        SpoolWriter(tmp_path / "s")


def test_a_killed_run_is_read_up_to_its_last_flush(tmp_path):
    t = _tracer()
    run = _start(tmp_path, t)
    assert run.partial.is_file() and not run.path.exists()
    samples = t.stream("noise", "fwq_ns", np.zeros(100, dtype=np.int64), units="ns")
    samples.data[:40] = np.arange(1, 41)
    samples.filled = 40
    t.table("offload", "calls", np.zeros(3, dtype=[("fd", "i4")]))
    t.attrs("noise", fwq_quantum_ns=1000)
    _wait_spooled(run, "noise/fwq_ns", 40)
    _wait_spooled(run, "offload/calls", 3)
    # The job dies here: nothing closes, nothing is renamed.
    with pytest.raises(RunFileError, match="incomplete run file"):
        open_run(run.partial)
    with open_run(run.partial, allow_incomplete=True) as r:
        assert r.partial and "partial run file" in r.note and "ending killed" in r.note
        assert r["noise/fwq_ns"].shape == (1, 40)
        assert r.read("noise/fwq_ns")[0].tolist() == list(range(1, 41))
        assert r.units("noise/fwq_ns") == "ns"
        assert len(r.table("offload/calls")) == 3
        assert r.group_attrs("noise")["fwq_quantum_ns"] == 1000
        assert r.ranks["host"][0] == b"h"
        assert not r.attrs["complete"]
    run.streamer.stop()


def test_finish_records_the_ending_and_renames(tmp_path):
    t = _tracer()
    run = _start(tmp_path, t)
    s = t.stream("noise", "fwq_ns", np.zeros(10, dtype=np.int64), units="ns")
    s.data[:7] = 5
    s.filled = 7
    ending = {"ending": "signal", "exit_status": 143, "signal": "SIGTERM", "rank": 0,
              "error": "", "time_ns": 1}
    path = run.finish(t, ending)
    assert path == tmp_path / "r.h5"
    assert not run.partial.exists() and not spool_dir(run.partial).exists()
    with open_run(path) as r:
        assert r.attrs["complete"] and not r.partial
        assert (r.attrs["ending"], r.attrs["signal"], r.attrs["exit_status"]) == \
            ("signal", "SIGTERM", 143)
        assert r["noise/fwq_ns"].shape == (1, 7)


def test_a_failed_rename_leaves_nothing_that_claims_to_be_complete(tmp_path, monkeypatch):
    def refuse(src, dst):
        raise OSError(errno.EIO, f"rename {src} -> {dst}: {os.strerror(errno.EIO)}")

    monkeypatch.setattr(writer, "rename_noreplace", refuse)
    t = _tracer()
    run = _start(tmp_path, t)
    t.array("noise", "fwq_ns", np.arange(5, dtype=np.int64))
    with pytest.raises(StorageError, match=r"r\.h5: EIO") as caught:
        run.finish(t, writer.normal_ending(0))
    assert caught.value.errno == errno.EIO
    assert not run.path.exists()
    final = spool_dir(run.partial) / writer.FINAL_NAME
    with h5py.File(final, "r") as f:
        assert not f.attrs["complete"]  # marked incomplete again
    with pytest.raises(RunFileError, match="incomplete"):
        open_run(run.partial)
    with open_run(run.partial, allow_incomplete=True) as r:
        assert r.partial and r.read("noise/fwq_ns")[0].tolist() == [0, 1, 2, 3, 4]
        assert r.attrs["ending"] == "normal"


def test_a_partial_named_file_is_never_complete(tmp_path):
    path = tmp_path / "x.h5.partial"
    with h5py.File(path, "w") as f:
        f.attrs.update({"schema": "mckmpi.run", "schema_version": 1, "complete": True})
    with pytest.raises(RunFileError, match="incomplete"):
        open_run(path)
    with pytest.raises(RunFileError, match="did not finish"):
        open_run(tmp_path / "x.h5")


def test_names_are_reserved_exclusively(tmp_path):
    t = _tracer()
    _start(tmp_path, t, flush_s=0)
    from mpi4py import MPI

    with pytest.raises(StorageError, match="EEXIST"):
        writer.RunFile.start(MPI.COMM_SELF, tmp_path / "r.h5", t, dict(ROOT), {})
    (tmp_path / "done.h5").write_bytes(b"")
    with pytest.raises(StorageError, match="EEXIST"):
        writer.RunFile.start(MPI.COMM_SELF, tmp_path / "done.h5", t, dict(ROOT), {})
    assert (tmp_path / "done.h5").read_bytes() == b""


def test_a_spool_write_failure_is_kept_not_raised_in_the_thread(tmp_path):
    t = _tracer()
    run = _start(tmp_path, t, flush_s=0.01)
    os.close(run.streamer.spool.fd)
    run.streamer.spool.fd = os.open("/dev/full", os.O_WRONLY)  # every write: ENOSPC
    t.array("noise", "x", np.arange(3))
    deadline = time.monotonic() + 10
    while run.streamer.error is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert run.streamer.error.errno == errno.ENOSPC
    with pytest.raises(StorageError, match="ENOSPC"):
        run.finish(t, writer.normal_ending(0))
    assert spool_path(spool_dir(run.partial), 0).is_file()


def test_an_ending_the_full_spool_cannot_take_goes_to_its_reserve(tmp_path):
    t = _tracer()
    run = _start(tmp_path, t, flush_s=0.01)
    t.array("noise", "x", np.arange(3))
    _wait_spooled(run, "noise/x", 3)
    os.close(run.streamer.spool.fd)
    run.streamer.spool.fd = os.open("/dev/full", os.O_WRONLY)  # the disk is full from here
    t.array("noise", "y", np.arange(4))
    end = {"ending": "io-error", "exit_status": 74, "signal": "", "rank": 0,
           "error": "cannot write d: ENOSPC (No space left on device)", "time_ns": 5}
    run.abandon(end)
    assert run.streamer.error.errno == errno.ENOSPC
    spool = spool_path(spool_dir(run.partial), 0)
    assert read_spool(spool).ending == {k: v for k, v in end.items()}
    with open_run(run.partial, allow_incomplete=True) as r:
        assert (r.attrs["ending"], r.attrs["exit_status"]) == ("io-error", 74), r.note
        assert r.read("noise/x")[0].tolist() == [0, 1, 2] and "noise/y" not in r


def test_a_spool_without_an_ending_reserve_still_reads(tmp_path):
    sp = SpoolWriter(tmp_path / "rank-000000.spool")
    sp.data("noise/x", "array", np.arange(3, dtype=np.int64), 0, 3, {}, True)
    sp.frame({"type": "ending", "ending": "normal"})
    sp.close()
    (tmp_path / "rank-000000.ending").unlink()  # as spools were before the reserve
    got = read_spool(tmp_path / "rank-000000.spool")
    assert got.ending == {"ending": "normal"} and not got.torn


def test_collect_marks_partial_runs_and_never_counts_them(tmp_path):
    from mckmpi.analysis import scaling, study

    done = _tracer()
    done.scalar("app", "wall_ns", 2_000_000_000, units="ns")
    done.attrs("app", scaling="strong")  # a point of a scaling series (a survey is none)
    from mpi4py import MPI

    writer.write_run(MPI.COMM_SELF, tmp_path / "done.h5", done, dict(ROOT), {})
    t = _tracer()
    t.scalar("app", "wall_ns", 1_000_000_000, units="ns")
    t.attrs("app", scaling="strong")
    run = _start(tmp_path, t)
    _wait_spooled(run, "app/wall_ns", 1)
    (spool_dir(run.partial) / writer.FINAL_NAME).write_bytes(b"half a file")  # the writer's
    collected = study.collect(tmp_path)
    assert not collected.skipped
    rows = {r["path"].decode(): r for r in collected.rows}
    assert set(rows) == {"done.h5", "r.h5.partial"}
    assert (rows["done.h5"]["complete"], rows["done.h5"]["ending"]) == (1, b"normal")
    assert (rows["r.h5.partial"]["complete"], rows["r.h5.partial"]["ending"]) == (0, b"killed")
    (curve,) = scaling.curves(collected.rows)
    assert list(curve.runs) == [1] and list(curve.time_s) == [2.0]
    assert np.isnan(rows["r.h5.partial"]["speedup"])
    assert "(partial)" in study.text(collected.rows)
    run.streamer.stop()


def test_the_job_ending_is_the_cause_not_its_consequences():
    from mckmpi.trace.schema import job_ending

    def end(word: str, rank: int, t: int, sig: str = "") -> dict:
        return {"ending": word, "rank": rank, "time_ns": t, "signal": sig,
                "exit_status": 143 if sig else 3, "error": f"{word} on {rank}"}

    normal = [end("normal", 0, 5), end("normal", 1, 9)]
    assert job_ending(normal)["ending"] == "normal" and job_ending(normal)["ending_time_ns"] == 9
    # rank 1 exits 3; the launcher then signals rank 0 (earlier on the clock, still a consequence)
    got = job_ending([end("signal", 0, 1, "SIGTERM"), end("exit", 1, 2)])
    assert (got["ending"], got["ending_rank"], got["exit_status"]) == ("exit", 1, 3)
    got = job_ending([end("signal", 0, 1, "SIGTERM"), None])
    assert (got["ending"], got["ending_rank"]) == ("killed", 1)
    got = job_ending([end("signal", 0, 4, "SIGTERM"), end("signal", 1, 2, "SIGTERM")])
    assert (got["ending"], got["ending_rank"], got["signal"]) == ("signal", 1, "SIGTERM")
    assert job_ending([None, None])["error"] == "no rank recorded an ending"


def test_tables_and_series_that_fill_together_stream(tmp_path):
    t = _tracer()
    run = _start(tmp_path, t)
    rows = np.zeros(10, dtype=[("bytes", "i8"), ("ns", "i8")])
    calls = t.stream("app", "calls", rows, units={"ns": "ns", "bytes": "B"})
    iters = t.stream("app", "iter_ns", np.zeros(6, dtype=np.int64), units="ns")
    assert t.stream("app", "comm_ns", np.zeros(6, dtype=np.int64), units="ns",
                    along=iters) is iters
    with pytest.raises(ValueError, match="cannot fill along"):
        t.stream("app", "short_ns", np.zeros(5, dtype=np.int64), along=iters)
    with pytest.raises(TypeError, match="'rank' field"):
        t.stream("app", "bad", np.zeros(3, dtype=[("rank", "i4")]))
    rows["bytes"][:4], rows["ns"][:4] = 8, [1, 2, 3, 4]
    calls.filled = 4
    t.records["app/iter_ns"].data[:3] = [10, 11, 12]
    t.records["app/comm_ns"].data[:3] = [5, 6, 7]
    iters.filled = 3
    _wait_spooled(run, "app/calls", 4)
    _wait_spooled(run, "app/comm_ns", 3)
    with open_run(run.partial, allow_incomplete=True) as r:  # killed here
        assert r.kind("app/calls") == "table" and r.units("app/calls", "ns") == "ns"
        assert r.table("app/calls", 0)["ns"].tolist() == [1, 2, 3, 4]
        assert r.read("app/comm_ns")[0].tolist() == [5, 6, 7]
    rows["ns"][4] = 5
    calls.filled = 5
    with open_run(run.finish(t, writer.normal_ending(0))) as r:
        assert r.table("app/calls")["ns"].tolist() == [1, 2, 3, 4, 5]
        assert r["app/iter_ns"].shape == r["app/comm_ns"].shape == (1, 3)


def test_a_counter_recorded_again_unchanged_is_not_spooled_again(tmp_path):
    t = Tracer()
    streamer = writer.Streamer(t, SpoolWriter(tmp_path / "s.spool"))
    t.scalar("memory", "peak", 5)
    assert streamer.flush() > 0
    t.scalar("memory", "peak", 5)
    assert streamer.flush() == 0
    t.scalar("memory", "peak", 6)
    assert streamer.flush() > 0
    streamer.close()
    assert read_spool(tmp_path / "s.spool").records["memory/peak"][1] == 6


def test_the_main_threads_counters_are_read_from_another_thread():
    import resource
    import threading

    from mckmpi.lwk.runtime import ThreadCounters

    counters = ThreadCounters.of_this_thread()
    try:
        seen = {}
        reader = threading.Thread(target=lambda: seen.update(counters.read()))
        before = resource.getrusage(resource.RUSAGE_THREAD)
        reader.start()
        reader.join()  # this thread waits: a voluntary switch, after `before`
        after = resource.getrusage(resource.RUSAGE_THREAD)
        assert before.ru_minflt <= seen["minflt"] <= after.ru_minflt
        assert before.ru_majflt <= seen["majflt"] <= after.ru_majflt
        assert before.ru_nvcsw <= seen["voluntary_switches"] <= after.ru_nvcsw
        assert before.ru_nivcsw <= seen["involuntary_switches"] <= after.ru_nivcsw
    finally:
        counters.close()


def _sample_in_python(ns: int) -> None:
    """Hold the GIL for about `ns` (a measured sample of an app in Python)."""
    end = time.monotonic_ns() + ns
    while time.monotonic_ns() < end:
        pass


def test_flushes_run_at_the_apps_safe_points_not_inside_a_sample(tmp_path):
    """A due flush waits for the app to set a stream's ``filled`` (between two samples) and
    runs there, while the app waits: no flush sees the app inside a sample. Without the
    safe points the streamer would take the GIL at any switch, mostly inside one."""
    t = Tracer()
    samples = t.stream("noise", "fwq_ns", np.zeros(100_000, dtype=np.int64), units="ns")
    state = {"in_sample": False}
    seen: list[bool] = []
    streamer = writer.Streamer(t, SpoolWriter(tmp_path / "s.spool"), flush_s=0.15)
    streamer.sources.append(lambda: seen.append(state["in_sample"]))
    streamer.start()
    try:
        end = time.monotonic() + 1.5
        i = 0
        while time.monotonic() < end:
            state["in_sample"] = True
            _sample_in_python(300_000)
            state["in_sample"] = False
            samples.filled = i = i + 1
    finally:
        streamer.stop()
        streamer.close()
    assert len(seen) >= 5 and not any(seen[:-1]), seen  # the last is stop's own flush
    assert read_spool(tmp_path / "s.spool").records["noise/fwq_ns"][1].size == i


def test_an_app_without_safe_points_is_still_flushed(tmp_path):
    """An app that never sets ``filled`` (one long sample) is flushed anyway, at most
    SAFE_POINT_WAIT_S after the flush was due."""
    t = Tracer()
    t.stream("noise", "fwq_ns", np.zeros(10, dtype=np.int64), units="ns")
    flushed: list[float] = []
    streamer = writer.Streamer(t, SpoolWriter(tmp_path / "s.spool"), flush_s=0.2)
    streamer.sources.append(lambda: flushed.append(time.monotonic()))
    start = time.monotonic()
    streamer.start()
    try:
        _sample_in_python(1_200_000_000)
    finally:
        streamer.stop()
        streamer.close()
    assert len(flushed) >= 4, flushed
    assert flushed[0] - start < 0.2 + writer.SAFE_POINT_WAIT_S + 0.5


def test_the_apps_lwk_safepoint_is_a_safe_point_for_the_flush(tmp_path):
    """`mckmpi.lwk.safepoint()`, the point an app chooses for the harness's deferred work,
    lets a due flush run too: an app that calls it (and never sets ``filled``) is flushed
    there, never inside its measured work."""
    import mckmpi.lwk
    from mckmpi.context import Context, current_context, set_context
    from mckmpi.node.placement import from_env

    t = Tracer()
    state = {"in_sample": False}
    seen: list[bool] = []
    before = current_context()
    set_context(Context(placement=from_env({}), tracer=t))
    streamer = writer.Streamer(t, SpoolWriter(tmp_path / "s.spool"), flush_s=0.15)
    streamer.sources.append(lambda: seen.append(state["in_sample"]))
    streamer.start()
    try:
        end = time.monotonic() + 1.2
        while time.monotonic() < end:
            state["in_sample"] = True
            _sample_in_python(2_000_000)
            state["in_sample"] = False
            mckmpi.lwk.safepoint()
    finally:
        streamer.stop()
        streamer.close()
        set_context(before)
        gc.unfreeze()  # the safepoint froze this test process's objects
    assert len(seen) >= 4 and not any(seen[:-1]), seen
