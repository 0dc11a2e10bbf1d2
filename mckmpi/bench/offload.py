"""Benchmark of the syscall offload, each figure next to its baseline from the same run.

* Round trip of a small offloaded call: 64-byte pwrite64 to a file in /dev/shm, p50/p99,
  next to the same call native and next to the floor of the mechanism -- notif-floor.c, a
  minimal C supervisor doing the same offload (goal: offloaded p50 <= 2x the floor's p50).
  The buffer is ordinary memory, so the proxy copies it in as the floor does; the same call
  from an arena buffer (no copy, no re-validation) is reported beside it.
  Measured twice: with the floor's two processes, the rank and the proxy all on one CPU
  (the same placement for both, and the fastest hand-off on any machine), and with
  everything unpinned as notif-floor ships (on a VM an idle CPU's wake-up then dominates
  both). Rounds of floor, native and offloaded alternate so a change in the machine's load
  hits all three. With the LWK core isolated (root; mckmpi/node/isolation.py: IRQs and
  kernel threads on the Linux core, no deep idle) and the proxy not spinning (and spinning),
  the small call against the same-CPU floor of the same rounds (goal: p50 <= 1.25x).
* A partitioned node (proxy on a Linux core, rank on an LWK core), each round once without
  and (root) once with the idle policy an isolated LWK job holds (no idle state with an
  exit latency on either core: per-CPU PM QoS, else /dev/cpu_dma_latency), in turns: the
  same-CPU floor, the cross-CPU floor (notif-floor-ranks.c, one rank), the small call with
  the proxy spinning (the default of a proxy with cores of its own) and not spinning
  (goal: p50 <= 2x the same-CPU floor of the same round), and 1 MiB writes from the rank's
  arena (the proxy writes straight from its mapping) and from ordinary memory (copied once
  into the proxy) and 1 MiB reads into the arena (pread64, as C I/O libraries read, and
  preadv), each against the same calls native
  (goal >= 0.9x): in blocks of 4 calls that take turns, same offsets of the same file from
  the same source rows, every page in place before timing, the order reversed every block
  and the median of the ratios per pair of blocks (`_bulk`).
* The asynchronous channel: a compute kernel's rate while a checkpoint is written through
  the channel versus without a checkpoint (goal: loss <= 10%), and versus writing the same
  checkpoint synchronously from the rank.
* Capacity: the proxy's on-CPU time per small call (utime+stime of all its threads, from
  /proc/PID/task/*/schedstat) next to the C floor's supervisor's (read from the exited
  supervisor before it is reaped), same placement, same rounds (goal <= 1.5x); and next to
  the same proxy serving every call in Python (`--interpreted`). Aggregate throughput and
  p99 latency with 1, 2, 4, 8, 16 and 32 ranks on one proxy limited to one CPU (goal: 8
  and 32 ranks >= 0.8x one rank), each next to notif-floor-ranks.c (shipped beside this
  module: a C supervisor with a thread per rank, same CPUs, same window); `mckmpi info
  --offload-load RATE` sizes a node from it.
"""

from __future__ import annotations

import gc
import hashlib
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from mckmpi.bench import write_result
from mckmpi.errors import UsageError
from mckmpi.linux import syscall
from mckmpi.lwk.arena import Arena
from mckmpi.node.isolation import isolated
from mckmpi.offload import accounting, client, seccomp, spawn
from mckmpi.offload.kernel_abi import SYS
from mckmpi.offload.policy import Policy

MiB = 1 << 20
FLOOR_GOAL = 2.0
CPU_GOAL = 1.5
CONTENTION_GOAL = 0.8
#: An isolated LWK core's offloaded small call vs the same-CPU floor (p50).
ISOLATED_GOAL = 1.25
BULK_GOAL = 0.9
CHANNEL_LOSS_GOAL = 0.10
SMALL = 64
BULK_SOURCE = 64 * MiB
ARENA = BULK_SOURCE + 16 * MiB


def floor_source() -> Path | None:
    """notif-floor.c: $MCKMPI_NOTIF_FLOOR_SRC, else ../shared/bench/ next to the repository."""
    env = os.environ.get("MCKMPI_NOTIF_FLOOR_SRC")
    if env:
        return Path(env) if Path(env).is_file() else None
    repo = Path(__file__).resolve().parents[2]
    candidate = repo.parent / "shared" / "bench" / "notif-floor.c"
    return candidate if candidate.is_file() else None


def _build_floor(src: Path, tmp: Path, *flags: str) -> tuple[Path | None, str]:
    exe = tmp / src.stem
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None, "no C compiler (cc) found"
    r = subprocess.run([cc, "-O2", *flags, "-o", str(exe), str(src)], capture_output=True,
                       text=True, timeout=120, check=False)
    if r.returncode != 0:
        return None, f"cc -O2 failed: {r.stderr.strip()[-300:]}"
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    return exe, (f"{Path(cc).name} -O2 {' '.join(flags) + ' ' if flags else ''}-o {src.stem} "
                 f"{src.name} (sha256 {digest}...)")


#: the floor of one supervisor serving many ranks (a thread per rank), shipped with mckmpi
FLOOR_RANKS_SRC = Path(__file__).with_name("notif-floor-ranks.c")


def _run_floor_ranks(exe: Path, ranks: int, seconds: float, path: str, supervisor_cpu: int,
                     rank_cpu: int) -> dict[str, float]:
    r = subprocess.run([str(exe), str(ranks), str(seconds), path, str(supervisor_cpu),
                        str(rank_cpu)], capture_output=True, text=True,
                       timeout=60 + 4 * seconds, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"notif-floor-ranks failed ({r.returncode}): {r.stderr.strip()}")
    return {key: float(value) for key, value in (line.split() for line in r.stdout.splitlines())}


def _run_floor(exe: Path, n: int, path: str, cpu: int | None) -> dict[str, float]:
    """One run of notif-floor; adds `supervisor_cpu_per_call_us`: the on-CPU time of its
    supervisor (the parent process, read while it is a zombie, so its own time without
    its child's) over the n calls it answered."""
    pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
    with tempfile.TemporaryFile("w+") as err, subprocess.Popen(
            [*pin, str(exe), str(n), path], stdout=subprocess.PIPE, stderr=err, text=True) as p:
        watchdog = threading.Timer(300, p.kill)
        watchdog.start()
        try:
            stdout = p.stdout.read() if p.stdout else ""  # EOF: both processes exited
            os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)  # a zombie: not reaped yet
            supervisor_ns = cpu_ns(p.pid)
            p.wait()
        finally:
            watchdog.cancel()
        err.seek(0)
        stderr = err.read()
    if p.returncode != 0:
        raise RuntimeError(f"notif-floor failed ({p.returncode}): {stderr.strip()}")
    out = {}
    for line in stdout.splitlines():
        key, value = line.split()
        out[key] = float(value)
    out["supervisor_cpu_per_call_us"] = supervisor_ns / n / 1e3
    return out


def cpu_ns(pid: int) -> int:
    """On-CPU nanoseconds (user + system) of every live thread of process `pid`, from
    /proc/PID/task/*/schedstat: utime+stime at nanosecond rather than tick resolution."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat", "rb") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass  # a thread that exited meanwhile
    return total


def _pct(ns: np.ndarray) -> dict[str, float]:
    return {"p50_us": round(float(np.percentile(ns, 50)) / 1e3, 3),
            "p99_us": round(float(np.percentile(ns, 99)) / 1e3, 3)}


# --- the rank: a forked child that attaches, measures and reports over a pipe ----------------


def _rank(conn: Any, sock: str, workdir: str, cpu: int | None, arena_bytes: int) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    arena = Arena(arena_bytes, hugepages="never", lock="auto")
    native_small = os.open(f"{workdir}/native-small", os.O_CREAT | os.O_RDWR, 0o600)
    native_bulk = os.open(f"{workdir}/native-bulk", os.O_CREAT | os.O_RDWR, 0o600)
    session = client.attach(sock, rank=0, arena_memfd=arena.memfd, arena_address=arena.address,
                            policy=Policy(include=(workdir,)))
    offl_small = os.open(f"{workdir}/offl-small", os.O_CREAT | os.O_RDWR, 0o600)
    offl_bulk = os.open(f"{workdir}/native-bulk", os.O_RDWR)  # the same file, offloaded
    offl_ckpt = os.open(f"{workdir}/offl-ckpt", os.O_CREAT | os.O_RDWR, 0o600)
    native_ckpt = os.open(f"{workdir}/native-ckpt", os.O_CREAT | os.O_RDWR, 0o600)
    small = b"x" * SMALL
    small_arena = arena.full(SMALL, ord("x"), dtype=np.uint8)
    # sources larger than the caches, written 1 MiB at a time, as a checkpoint would be
    bulk_arena = arena.full(BULK_SOURCE // 8, 1.0).reshape(-1, MiB // 8)
    bulk_plain = np.full(BULK_SOURCE // 8, 2.0).reshape(-1, MiB // 8)
    gc.disable()
    channel = None
    while True:
        msg = conn.recv()
        if msg is None:
            break
        what, n = msg[0], msg[1]
        if what == "small":
            lat = np.empty((3, n), np.int64)
            clock = time.perf_counter_ns
            for row, (fd, buf) in enumerate(((native_small, small), (offl_small, small),
                                             (offl_small, small_arena))):
                for i in range(n):
                    t = clock()
                    os.pwrite(fd, buf, 0)
                    lat[row, i] = clock() - t
            conn.send(lat.tobytes())
        elif what == "plain":  # only the offloaded call the floor makes, for CPU per call
            for i in range(n):
                os.pwrite(offl_small, small, 0)
            conn.send(n)
        elif what == "bulk":
            conn.send(_bulk(n, msg[2], msg[3], native_bulk, offl_bulk, bulk_arena, bulk_plain))
        elif what == "compute":
            mode, seconds, ckpt_chunks, chunk_mib = msg[1], msg[2], msg[3], msg[4]
            if channel is None:
                channel = session.channel(slots=8)
            conn.send(_compute(mode, seconds, ckpt_chunks, chunk_mib, arena, channel,
                               offl_ckpt, native_ckpt))
    conn.send(session.detach().tobytes())


def _bulk(blocks: int, block: int, span: int, native_fd: int, offl_fd: int,
          arena_buf: np.ndarray, plain_buf: np.ndarray) -> dict[str, list[int]]:
    """1 MiB writes and reads, native and offloaded, in blocks of `block` calls that take
    turns (the order reversed every block), so a change of the machine's load hits each
    kind alike; returns each kind's time per block (ns). Every kind of a block writes or reads
    the same offsets of the same file from (into) the same rows of its source, and every
    page of file and sources exists before timing, so the page cache is in the same state
    for all of them."""
    writes = {"native": (native_fd, arena_buf), "arena": (offl_fd, arena_buf),
              "plain": (offl_fd, plain_buf)}
    # into the arena: pread64, as C I/O libraries (HDF5, stdio) read, and preadv, the only
    # read into a buffer Python has
    reads = {"native_read": (native_fd, _pread), "arena_read": (offl_fd, _pread),
             "native_readv": (native_fd, _preadv), "arena_readv": (offl_fd, _preadv)}
    rows = len(arena_buf)
    for fd, buf in writes.values():  # warm: every row of the sources, every page of the file
        for i in range(max(rows, span)):
            os.pwrite(fd, buf[i % rows], (i % span) * MiB)
    for fd, read in reads.values():
        for i in range(max(rows, span)):
            read(fd, arena_buf[i % rows], (i % span) * MiB)
    out: dict[str, list[int]] = {k: [] for k in (*writes, *reads)}
    clock = time.perf_counter_ns
    for b in range(blocks):
        first = b * block
        for name in writes if b % 2 == 0 else reversed(writes):
            fd, buf = writes[name]
            t = clock()
            for i in range(first, first + block):
                os.pwrite(fd, buf[i % rows], (i % span) * MiB)
            out[name].append(clock() - t)
        for name in reads if b % 2 == 0 else reversed(reads):
            fd, read = reads[name]
            t = clock()
            for i in range(first, first + block):
                read(fd, arena_buf[i % rows], (i % span) * MiB)
            out[name].append(clock() - t)
    return out


_PREAD64 = SYS["pread64"]


def _pread(fd: int, buf: np.ndarray, offset: int) -> None:
    """pread64(2) into `buf` (a raw system call: Python's os.pread returns new bytes)."""
    r = syscall(_PREAD64, fd, buf.ctypes.data, buf.nbytes, offset)
    if r != buf.nbytes:
        raise OSError(-r if r < 0 else 0, f"pread64 returned {r}")


def _preadv(fd: int, buf: np.ndarray, offset: int) -> None:
    os.preadv(fd, [buf], offset)


def _kernel(x: np.ndarray, y: np.ndarray) -> None:
    """An L2-resident, single-threaded compute step (no BLAS threads to disturb the test)."""
    np.multiply(x, 1.0000001, out=x)
    np.add(x, y, out=x)


def _compute(mode: str, seconds: float, chunks: int, chunk_mib: int, arena: Arena,
             channel: Any, offl_fd: int, native_fd: int) -> dict[str, float]:
    """Compute for `seconds`; meanwhile stream checkpoint chunks through the channel, or
    write them from the rank (sync), or nothing. Returns the compute rate and bytes written."""
    x = np.ones(16384)
    y = np.full(16384, 1e-9)
    ckpt = arena.full(chunk_mib * MiB // 8, 3.0)
    iters = submitted = 0
    clock = time.perf_counter
    t0 = clock()
    end = t0 + seconds
    if mode == "none":
        while clock() < end:
            _kernel(x, y)
            iters += 1
    elif mode == "channel":
        while clock() < end:
            while channel.in_flight < channel.slots:
                channel.write(offl_fd, (submitted % chunks) * chunk_mib * MiB, ckpt)
                submitted += 1
            _kernel(x, y)
            iters += 1
            channel.poll()
        submitted -= channel.in_flight
        channel.wait()
    else:
        while clock() < end:
            os.pwrite(native_fd, ckpt, (submitted % chunks) * chunk_mib * MiB)
            submitted += 1
            _kernel(x, y)
            iters += 1
    elapsed = clock() - t0
    return {"rate": iters / elapsed, "MBps": submitted * chunk_mib * MiB / elapsed / 1e6}


def _load_rank(conn: Any, sock: str, workdir: str, cpu: int | None, index: int,
               max_calls: int) -> None:
    """A rank of the capacity phase: 64-byte pwrite64 back to back for a window of time."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    session = client.attach(sock, rank=index, arena_memfd=None, policy=Policy(include=(workdir,)))
    fd = os.open(f"{workdir}/load-{index}", os.O_CREAT | os.O_RDWR, 0o600)
    small = b"y" * SMALL
    lat = np.zeros(max_calls, np.int64)
    gc.disable()
    conn.send("ready")
    seconds = conn.recv()
    clock = time.perf_counter_ns
    pwrite = os.pwrite
    start = clock()
    end = start + int(seconds * 1e9)
    i = 0
    while i < max_calls:
        t = clock()
        pwrite(fd, small, 0)
        t2 = clock()
        lat[i] = t2 - t
        i += 1
        if t2 >= end:
            break
    elapsed = clock() - start
    os.close(fd)
    conn.send((i, elapsed, lat[:i].tobytes()))
    conn.recv()
    conn.send(session.detach().tobytes())


def _fork(target: Any, *args: Any) -> tuple[int, Any]:
    """Fork a child running target(conn, *args); the parent keeps the other end."""
    a, b = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            a.close()
            target(Connection(b.detach()), *args)
            code = 0
        except BaseException:  # noqa: BLE001 -- a forked child reports and always _exits
            traceback.print_exc()
        finally:
            os._exit(code)
    b.close()
    return pid, Connection(a.detach())


# --- phases ----------------------------------------------------------------------------------


def _fork_rank(sock: Path, workdir: Path, cpu: int | None, arena_bytes: int) -> tuple[int, Any]:
    return _fork(_rank, str(sock), str(workdir), cpu, arena_bytes)


def _finish(pid: int, conn: Any, handle: spawn.ProxyHandle) -> int:
    conn.send(None)
    records = len(conn.recv()) // accounting.RECORD_DTYPE.itemsize
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError("benchmark rank failed")
    handle.wait(30)
    return records


def _small_phase(workdir: Path, floor_exe: Path | None, rounds: int, n: int,
                 cpu: int | None) -> dict[str, Any]:
    """Rounds of floor / native / offloaded; all on `cpu`, or all unpinned (cpu None)."""
    handle = spawn.start_node_proxy(workdir / f"run-small-{cpu}", [cpu] if cpu is not None else [],
                                    expected=1, spin_us=0)
    pid, conn = _fork_rank(handle.socket_path, workdir, cpu, ARENA)
    # the same rank on a proxy that serves every call in Python, for the same-run comparison
    py_handle = spawn.start_node_proxy(workdir / f"run-small-py-{cpu}",
                                       [cpu] if cpu is not None else [], expected=1, spin_us=0,
                                       compiled=False)
    py_pid, py_conn = _fork_rank(py_handle.socket_path, workdir, cpu, ARENA)
    py_cpu = []
    floors: list[dict[str, float]] = []
    native, offl, arena, ratios, proxy_cpu = [], [], [], [], []
    for _ in range(rounds):
        if floor_exe is not None:
            floors.append(_run_floor(floor_exe, n, str(workdir / "floor.dat"), cpu))
        conn.send(("small", n))
        lat = np.frombuffer(conn.recv(), np.int64).reshape(3, n)
        native.append(lat[0])
        offl.append(lat[1])
        arena.append(lat[2])
        if floors:
            ratios.append(float(np.percentile(lat[1], 50)) / 1e3
                          / floors[-1]["offloaded_pwrite64_p50_us"])
        before = cpu_ns(handle.pid)
        conn.send(("plain", n))
        conn.recv()
        proxy_cpu.append((cpu_ns(handle.pid) - before) / n / 1e3)
        before = cpu_ns(py_handle.pid)
        py_conn.send(("plain", n))
        py_conn.recv()
        py_cpu.append((cpu_ns(py_handle.pid) - before) / n / 1e3)
    _finish(py_pid, py_conn, py_handle)
    records = _finish(pid, conn, handle)
    out: dict[str, Any] = {
        "placement": (f"floor, rank and proxy all on CPU {cpu}" if cpu is not None else
                      "floor as shipped, rank and proxy unpinned (the scheduler places them)"),
        "iterations_per_round": n, "rounds": rounds,
        "native_pwrite64": _pct(np.concatenate(native)),
        "offloaded_pwrite64": _pct(np.concatenate(offl)),
        "offloaded_pwrite64_from_arena": _pct(np.concatenate(arena)),
        "records": records,
        "proxy_cpu_per_call_us": round(float(np.median(proxy_cpu)), 3),
        "interpreted_proxy_cpu_per_call_us": round(float(np.median(py_cpu)), 3),
        "ratio_compiled_over_interpreted_cpu": round(
            float(np.median(np.array(proxy_cpu) / np.array(py_cpu))), 3),
    }
    if floors:
        floor_cpu = [f["supervisor_cpu_per_call_us"] for f in floors]
        out["floor_supervisor_cpu_per_call_us"] = round(float(np.median(floor_cpu)), 3)
        out["ratio_proxy_cpu_over_floor_per_round"] = [
            round(p / f, 3) for p, f in zip(proxy_cpu, floor_cpu)]
        out["ratio_proxy_cpu_over_floor"] = round(
            float(np.median(np.array(proxy_cpu) / np.array(floor_cpu))), 3)
        out["goal_proxy_cpu_over_floor"] = CPU_GOAL
        out["goal_proxy_cpu_met"] = out["ratio_proxy_cpu_over_floor"] <= CPU_GOAL
        out["floor_offloaded_pwrite64"] = {
            "p50_us": round(float(np.median([f["offloaded_pwrite64_p50_us"] for f in floors])), 3),
            "p99_us": round(float(np.median([f["offloaded_pwrite64_p99_us"] for f in floors])), 3)}
        out["floor_native_pwrite64_p50_us"] = round(
            float(np.median([f["native_pwrite64_p50_us"] for f in floors])), 3)
        out["ratio_p50_over_floor_per_round"] = [round(r, 3) for r in ratios]
        out["ratio_p50_over_floor"] = round(float(np.median(ratios)), 3)
        out["goal_p50_over_floor"] = FLOOR_GOAL
        out["goal_met"] = out["ratio_p50_over_floor"] <= FLOOR_GOAL
    return out


RANKS_PER_PROXY = (1, 2, 4, 8, 16, 32)


def _capacity_phase(workdir: Path, quick: bool, compiled: bool = True,
                    sizes: tuple[int, ...] = RANKS_PER_PROXY,
                    floor_exe: Path | None = None) -> dict[str, Any]:
    """Aggregate small-call throughput with 1..32 ranks on one proxy limited to one CPU.

    The proxy gets the first CPU and no spinning (its on-CPU time is then its work); the
    ranks share the last CPU (oversubscribed here, as ranks would share none on an LWK
    node). Each rank calls back to back for the same window; the proxy's on-CPU time over
    the window divided by the calls is its cost per call under that load. With `floor_exe`
    (notif-floor-ranks) each size is also run on the C floor, same CPUs, same window.
    """
    cpus = sorted(os.sched_getaffinity(0))
    proxy_cpu, rank_cpu = cpus[0], cpus[-1]
    seconds = 0.5 if quick else 2.0
    max_calls = 400_000
    sweep = []
    for k in sizes:
        handle = spawn.start_node_proxy(workdir / f"run-load-{k}-{compiled}", [proxy_cpu],
                                        expected=k, spin_us=0, compiled=compiled)
        ranks = [_fork(_load_rank, str(handle.socket_path), str(workdir), rank_cpu, i,
                       max_calls) for i in range(k)]
        for _, conn in ranks:
            if conn.recv() != "ready":
                raise RuntimeError("a load rank did not start")
        before = cpu_ns(handle.pid)
        for _, conn in ranks:
            conn.send(seconds)
        results = [conn.recv() for _, conn in ranks]
        used = cpu_ns(handle.pid) - before
        records = 0
        for pid, conn in ranks:
            conn.send(None)
            records += len(conn.recv()) // accounting.RECORD_DTYPE.itemsize
            _, status = os.waitpid(pid, 0)
            if os.waitstatus_to_exitcode(status) != 0:
                raise RuntimeError("a load rank failed")
        handle.wait(30)
        calls = sum(r[0] for r in results)
        window = max(r[1] for r in results) / 1e9
        lat = np.concatenate([np.frombuffer(r[2], np.int64) for r in results])
        floor = {}
        if floor_exe is not None:
            f = _run_floor_ranks(floor_exe, k, seconds, str(workdir / "floor-ranks.dat"),
                                 proxy_cpu, rank_cpu)
            floor = {"floor_calls_per_s": round(f["calls_per_s"]),
                     "floor_supervisor_cpu_per_call_us": round(f["supervisor_cpu_per_call_us"], 3),
                     "ratio_calls_per_s_over_floor": round(calls / window / f["calls_per_s"], 3)}
        sweep.append({
            "ranks": k, "calls": calls, "window_s": round(window, 3),
            "calls_per_s": round(calls / window),
            "p50_us": round(float(np.percentile(lat, 50)) / 1e3, 2),
            "p99_us": round(float(np.percentile(lat, 99)) / 1e3, 2),
            "proxy_cpu_per_call_us": round(used / calls / 1e3, 3),
            "proxy_cpu_utilization": round(used / 1e9 / window, 3),
            "records": records,
            **floor,
        })
    single = sweep[0]["calls_per_s"]
    peak = max(row["calls_per_s"] for row in sweep)
    by_k = {row["ranks"]: row for row in sweep}
    ratios = {f"ratio_{k}_ranks_over_1": round(by_k[k]["calls_per_s"] / single, 3)
              for k in sizes[1:]}
    ratios.update({f"ratio_{k}_ranks_over_peak": round(by_k[k]["calls_per_s"] / peak, 3)
                   for k in (8, 32)})
    return {
        "proxy": "compiled hot path" if compiled else "interpreted (mckmpi proxy --interpreted)",
        "placement": (f"proxy on CPU {proxy_cpu}, every rank on CPU {rank_cpu}"
                      if proxy_cpu != rank_cpu else f"proxy and ranks on CPU {proxy_cpu}"),
        "call": f"{SMALL} B pwrite64 from ordinary memory, back to back",
        "sweep": sweep,
        **ratios,
        "peak_calls_per_s": peak,
        "goal_ratio_over_1": CONTENTION_GOAL,
        "goal_met": min(ratios["ratio_8_ranks_over_1"], ratios["ratio_32_ranks_over_1"])
        >= CONTENTION_GOAL,
        # one synchronous rank cannot load the proxy (it waits for each answer), so the
        # stricter reading of "no collapse" is against the best rate of the sweep
        "goal_met_over_peak": min(ratios["ratio_8_ranks_over_peak"],
                                  ratios["ratio_32_ranks_over_peak"]) >= CONTENTION_GOAL,
        # the cost that sizes a node: a call's under the heaviest load (a lightly loaded
        # proxy pays a wake-up per call, but then it has cycles to spare)
        "proxy_cpu_per_call_us": sweep[-1]["proxy_cpu_per_call_us"],
    }


def _isolated_phase(workdir: Path, floor_exe: Path | None, rounds: int, n: int) -> dict[str, Any]:
    """Rank on the LWK core, proxy on the Linux core (woken per call, no spinning), the LWK
    core isolated; rounds alternate with the floor on one CPU (the rank's) and with the same
    rank on a proxy that spins (the default of a proxy with cores of its own)."""
    proxy_cpus, rank_cpu, placement = _partition()
    if rank_cpu is None:
        return {"skipped": placement}
    if os.geteuid() != 0:
        return {"skipped": "isolating the LWK core needs root"}
    offl, floors, ratios, spun, spun_ratios = [], [], [], [], []
    with isolated(proxy_cpus, [rank_cpu]) as applied:
        handle = spawn.start_node_proxy(workdir / "run-isolated", proxy_cpus, expected=1, spin_us=0)
        pid, conn = _fork_rank(handle.socket_path, workdir, rank_cpu, ARENA)
        spinning = spawn.start_node_proxy(workdir / "run-isolated-spin", proxy_cpus, expected=1)
        spin_pid, spin_conn = _fork_rank(spinning.socket_path, workdir, rank_cpu, ARENA)
        for _ in range(rounds):
            if floor_exe is not None:
                floors.append(_run_floor(floor_exe, n, str(workdir / "floor.dat"), rank_cpu))
            for c, got, rs in ((conn, offl, ratios), (spin_conn, spun, spun_ratios)):
                c.send(("small", n))
                lat = np.frombuffer(c.recv(), np.int64).reshape(3, n)
                got.append(lat[1])
                if floors:
                    rs.append(float(np.percentile(lat[1], 50)) / 1e3
                              / floors[-1]["offloaded_pwrite64_p50_us"])
        records = _finish(pid, conn, handle) + _finish(spin_pid, spin_conn, spinning)
    out: dict[str, Any] = {
        "placement": f"{placement}; proxy not spinning (proxy_spinning: the same rank on a "
                     f"spinning proxy); floor on CPU {rank_cpu}",
        "isolation": applied.describe(), "iterations_per_round": n, "rounds": rounds,
        "offloaded_pwrite64": _pct(np.concatenate(offl)), "records": records,
        "proxy_spinning": {"offloaded_pwrite64": _pct(np.concatenate(spun))},
    }
    if floors:
        out["floor_same_cpu_p50_us"] = round(float(np.median(
            [f["offloaded_pwrite64_p50_us"] for f in floors])), 3)
        out["ratio_p50_over_floor_per_round"] = [round(r, 3) for r in ratios]
        out["ratio_p50_over_floor"] = round(float(np.median(ratios)), 3)
        out["goal_p50_over_floor"] = ISOLATED_GOAL
        out["goal_met"] = out["ratio_p50_over_floor"] <= ISOLATED_GOAL
        spin = out["proxy_spinning"]
        spin["ratio_p50_over_floor_per_round"] = [round(r, 3) for r in spun_ratios]
        spin["ratio_p50_over_floor"] = round(float(np.median(spun_ratios)), 3)
        spin["goal_met"] = spin["ratio_p50_over_floor"] <= ISOLATED_GOAL
    return out


def _partition() -> tuple[list[int], int | None, str]:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return [], None, f"one CPU ({cpus}): rank and proxy share it"
    return [cpus[0]], cpus[-1], f"proxy on CPU {cpus[0]}, rank on CPU {cpus[-1]}"


#: bulk blocks per round and condition, and 1 MiB calls per block
BULK_BLOCKS, BULK_BLOCK = 16, 4


@contextmanager
def _idle_condition(held: bool, proxy_cpus: list[int], rank_cpu: int) -> Iterator[None]:
    """The idle policy of an LWK job (no deep idle on the rank's and the proxy's cores:
    `isolation.apply(idle_only=True)`) for one case of a round, or nothing."""
    if not held:
        yield
        return
    with isolated(proxy_cpus, [rank_cpu], idle_only=True):
        yield


def _idle_policy_available(proxy_cpus: list[int], rank_cpu: int | None) -> str | None:
    """None if the partitioned phase can hold the idle policy here, else why not."""
    if rank_cpu is None:
        return "one CPU: no partition"
    if os.geteuid() != 0:
        return "PM QoS needs root"
    try:
        with isolated(proxy_cpus, [rank_cpu], idle_only=True) as applied:
            refused = [why for what, why in applied.refused]
    except UsageError as exc:  # another isolation of this host, of another split
        return str(exc)
    return "; ".join(refused) or None


def _partitioned_phase(workdir: Path, quick: bool, floor_exe: Path | None,
                       ranks_exe: Path | None) -> dict[str, Any]:
    """Proxy on a Linux core, rank on an LWK core. Each round measures every case once
    without and (root) once with the idle policy held, in alternating order: the same-CPU
    floor (notif-floor on the rank's CPU), the cross-CPU floor (notif-floor-ranks, one rank),
    our small call with the proxy spinning (the default of a proxy with cores of its own)
    and not spinning, and the 1 MiB reads and writes native and offloaded (`_bulk`). Ratios
    are taken within a round and the median over rounds is reported."""
    proxy_cpus, rank_cpu, placement = _partition()
    chunk_mib, chunks = 4, (16 if quick else 64)
    rounds = 3 if quick else 7
    n_small = 5_000 if quick else 20_000
    blocks = BULK_BLOCKS // 2 if quick else BULK_BLOCKS
    floor_seconds = 0.25 if quick else 0.5
    why_not = _idle_policy_available(proxy_cpus, rank_cpu)
    conditions = ["not_held"] + ([] if why_not else ["held"])
    proxies = {"spinning": spawn.start_node_proxy(workdir / "run-part", proxy_cpus, expected=1)}
    if proxy_cpus:
        proxies["not_spinning"] = spawn.start_node_proxy(workdir / "run-part-still", proxy_cpus,
                                                         expected=1, spin_us=0)
    ranks = {k: _fork_rank(h.socket_path, workdir, rank_cpu, ARENA) for k, h in proxies.items()}
    conn = ranks["spinning"][1]
    per: dict[str, dict[str, list]] = {c: {} for c in conditions}
    for r in range(rounds):
        for cond in conditions if r % 2 == 0 else conditions[::-1]:
            got = per[cond]
            with _idle_condition(cond == "held", proxy_cpus, rank_cpu):
                if floor_exe is not None:
                    f = _run_floor(floor_exe, n_small, str(workdir / "floor.dat"), rank_cpu)
                    got.setdefault("floor_same_cpu", []).append(f["offloaded_pwrite64_p50_us"])
                if ranks_exe is not None and proxy_cpus:
                    f = _run_floor_ranks(ranks_exe, 1, floor_seconds, str(workdir / "fr.dat"),
                                         proxy_cpus[0], rank_cpu)
                    got.setdefault("floor_cross_cpu", []).append(f["p50_us"])
                    got.setdefault("floor_cross_cpu_p99", []).append(f["p99_us"])
                for name, (_, c) in ranks.items():
                    c.send(("small", n_small))
                    lat = np.frombuffer(c.recv(), np.int64).reshape(3, n_small)
                    got.setdefault(f"lat_{name}", []).append(lat)
                conn.send(("bulk", blocks, BULK_BLOCK, 48))
                for k, v in conn.recv().items():
                    got.setdefault(f"bulk_{k}", []).extend(v)
    seconds = 0.5 if quick else 1.0
    comp: dict[str, list[dict[str, float]]] = {"none": [], "channel": [], "sync": []}
    for r in range(rounds):
        for mode in ("none", "channel", "sync") if r % 2 == 0 else ("sync", "channel", "none"):
            conn.send(("compute", mode, seconds, chunks, chunk_mib))
            comp[mode].append(conn.recv())
    records = sum(_finish(p, c, proxies[k]) for k, (p, c) in ranks.items())
    cases = {cond: _partitioned_case(per[cond], rounds, n_small) for cond in conditions}
    head = cases["held" if "held" in cases else "not_held"]
    rate = {k: float(np.median([r["rate"] for r in v])) for k, v in comp.items()}
    losses = [1 - c["rate"] / n["rate"] for c, n in zip(comp["channel"], comp["none"])]
    loss = float(np.median(losses))
    return {
        "placement": placement,
        "idle_policy": ("held in the rounds marked held (per-CPU PM QoS, else "
                        "/dev/cpu_dma_latency, on the rank's and the proxy's cores)"
                        if not why_not else f"not held: {why_not}"),
        "headline_case": "held" if "held" in cases else "not_held",
        "small_call_cross_cpu": head["small_call_cross_cpu"],
        "ratio_p50_over_same_cpu_floor": head.get("ratio_p50_over_same_cpu_floor", "no floor"),
        "goal_p50_over_same_cpu_floor": FLOOR_GOAL,
        "goal_met": head.get("ratio_p50_over_same_cpu_floor", FLOOR_GOAL + 1) <= FLOOR_GOAL,
        "bulk_1mib": head["bulk_1mib"],
        "cases": cases,
        "channel": {
            "window_s": seconds, "file_MiB": chunks * chunk_mib, "request_MiB": chunk_mib,
            "rounds": rounds,
            "compute_rate_no_checkpoint": round(rate["none"], 1),
            "compute_rate_channel_checkpoint": round(rate["channel"], 1),
            "compute_rate_sync_checkpoint": round(rate["sync"], 1),
            "checkpoint_MBps_channel": round(float(np.median([r["MBps"] for r in comp["channel"]])), 1),
            "checkpoint_MBps_sync": round(float(np.median([r["MBps"] for r in comp["sync"]])), 1),
            "loss_channel_per_round": [round(x, 4) for x in losses],
            "loss_channel": round(loss, 4),
            "loss_sync": round(1 - rate["sync"] / rate["none"], 4),
            "goal_loss": CHANNEL_LOSS_GOAL,
            "goal_met": loss <= CHANNEL_LOSS_GOAL,
        },
        "records": records,
    }


def _partitioned_case(got: dict[str, list], rounds: int, n: int) -> dict[str, Any]:
    """One idle condition of the partitioned phase: latencies pooled, ratios per round."""
    out: dict[str, Any] = {}
    for name in ("spinning", "not_spinning"):
        lats = got.get(f"lat_{name}")
        if lats is None:
            continue
        row = {"native_pwrite64": _pct(np.concatenate([x[0] for x in lats])),
               "offloaded_pwrite64": _pct(np.concatenate([x[1] for x in lats])),
               "offloaded_pwrite64_from_arena": _pct(np.concatenate([x[2] for x in lats]))}
        if "floor_same_cpu" in got:
            ratios = [float(np.percentile(x[1], 50)) / 1e3 / f
                      for x, f in zip(lats, got["floor_same_cpu"])]
            row["ratio_p50_over_same_cpu_floor_per_round"] = [round(x, 3) for x in ratios]
            row["ratio_p50_over_same_cpu_floor"] = round(float(np.median(ratios)), 3)
        if "floor_cross_cpu" in got:
            ratios = [float(np.percentile(x[1], 50)) / 1e3 / f
                      for x, f in zip(lats, got["floor_cross_cpu"])]
            row["ratio_p50_over_cross_cpu_floor"] = round(float(np.median(ratios)), 3)
        out[f"proxy_{name}"] = row
    if "floor_same_cpu" in got:
        out["floor_same_cpu_p50_us"] = round(float(np.median(got["floor_same_cpu"])), 3)
    if "floor_cross_cpu" in got:
        out["floor_cross_cpu"] = {
            "p50_us": round(float(np.median(got["floor_cross_cpu"])), 3),
            "p99_us": round(float(np.median(got["floor_cross_cpu_p99"])), 3)}
    head = out["proxy_spinning"]
    out["small_call_cross_cpu"] = {k: head[k] for k in (
        "native_pwrite64", "offloaded_pwrite64", "offloaded_pwrite64_from_arena")}
    if "ratio_p50_over_same_cpu_floor" in head:
        out["ratio_p50_over_same_cpu_floor"] = head["ratio_p50_over_same_cpu_floor"]
    out["rounds"] = rounds
    out["iterations_per_round"] = n
    t = {k[5:]: np.array(v, dtype=np.float64) for k, v in got.items() if k.startswith("bulk_")}
    block = BULK_BLOCK * MiB

    # Throughput of a over b per pair of blocks (b's time over a's): a pair holds both
    # orders, so whichever kind comes first in a block and finds the rows and pages colder
    # in the caches does so once in each pair (per block, the ratios fall in two humps).
    pair = {k: v[0::2] + v[1::2] for k, v in t.items()}

    def ratio(a: str, b: str) -> float:
        return round(float(np.median(pair[b] / pair[a])), 3)

    bulk = {
        "blocks": len(t["native"]), "MiB_per_block": BULK_BLOCK,
        "order": "native, arena, plain writes, then native and arena reads with pread64 and "
                 "with preadv, in turns per block (reversed every other block); ratios per "
                 "pair of blocks",
        **{f"{k}_MBps": round(block / float(np.median(t[k])) * 1e3, 1) for k in t},
        "ratio_arena_over_native": ratio("arena", "native"),
        "ratio_plain_over_native": ratio("plain", "native"),
        "ratio_arena_read_over_native": ratio("arena_read", "native_read"),
        "ratio_arena_readv_over_native": ratio("arena_readv", "native_readv"),
        "ratio_arena_over_native_quartiles": [round(float(x), 3) for x in np.percentile(
            pair["native"] / pair["arena"], [25, 75])],
        "ratio_arena_read_over_native_quartiles": [round(float(x), 3) for x in np.percentile(
            pair["native_read"] / pair["arena_read"], [25, 75])],
        "goal_arena_over_native": BULK_GOAL,
    }
    bulk["goal_met"] = bulk["ratio_arena_over_native"] >= BULK_GOAL
    bulk["goal_read_met"] = bulk["ratio_arena_read_over_native"] >= BULK_GOAL
    out["bulk_1mib"] = bulk
    return out


def run(out_dir: Path, quick: bool = False) -> dict:
    """Run the offload benchmark; write and return bench-offload.json's content."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seccomp.require()
    result: dict[str, Any] = {
        "benchmark": "offload", "quick": quick, "python": sys.version.split()[0],
        "kernel": platform.release(), "cpus": os.cpu_count(),
        "loadavg_at_start": round(os.getloadavg()[0], 2),
    }
    tmp = Path(tempfile.mkdtemp(prefix="mckmpi-bench-offload-"))
    workdir = Path(tempfile.mkdtemp(prefix="mckmpi-bench-offload-", dir="/dev/shm"))
    try:
        src = floor_source()
        exe = None
        if src is None:
            result["floor"] = "skipped: notif-floor.c not found (set MCKMPI_NOTIF_FLOOR_SRC)"
        else:
            exe, how = _build_floor(src, tmp)
            result["floor"] = how if exe else f"skipped: {how}"
        rounds, n = (3, 5_000) if quick else (7, 20_000)
        result["small_call"] = _small_phase(workdir, exe, rounds, n, max(os.sched_getaffinity(0)))
        result["small_call_unpinned"] = _small_phase(workdir, exe, rounds, n, None)
        ranks_exe, how = _build_floor(FLOOR_RANKS_SRC, tmp, "-pthread")
        result["floor_ranks"] = how if ranks_exe else f"skipped: {how}"
        result["partitioned"] = _partitioned_phase(workdir, quick, exe, ranks_exe)
        result["capacity"] = _capacity_phase(workdir, quick, floor_exe=ranks_exe)
        result["capacity_interpreted"] = _capacity_phase(workdir, quick, compiled=False,
                                                         sizes=(1, 8, 32))
        result["small_call_isolated"] = _isolated_phase(workdir, exe, rounds, n)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)
    result["loadavg_at_end"] = round(os.getloadavg()[0], 2)
    small = result["small_call"]
    part = result["partitioned"]
    result.update({  # headline scalars
        "small_p50_us": small["offloaded_pwrite64"]["p50_us"],
        "small_ratio_over_floor": small.get("ratio_p50_over_floor", "no floor"),
        "small_ratio_over_floor_unpinned": result["small_call_unpinned"].get(
            "ratio_p50_over_floor", "no floor"),
        "small_isolated_ratio_over_same_cpu_floor": result["small_call_isolated"].get(
            "ratio_p50_over_floor", result["small_call_isolated"].get("skipped", "no floor")),
        "small_isolated_spinning_ratio_over_same_cpu_floor": result["small_call_isolated"].get(
            "proxy_spinning", {}).get("ratio_p50_over_floor", result["small_call_isolated"].get(
                "skipped", "no floor")),
        "bulk_arena_over_native": part["bulk_1mib"]["ratio_arena_over_native"],
        "bulk_arena_read_over_native": part["bulk_1mib"]["ratio_arena_read_over_native"],
        "channel_compute_loss": part["channel"]["loss_channel"],
        "proxy_cpu_per_call_us": small["proxy_cpu_per_call_us"],
        "proxy_cpu_over_floor": small.get("ratio_proxy_cpu_over_floor", "no floor"),
        "capacity_8_ranks_over_1": result["capacity"]["ratio_8_ranks_over_1"],
        "capacity_32_ranks_over_1": result["capacity"]["ratio_32_ranks_over_1"],
        "capacity_32_ranks_over_peak": result["capacity"]["ratio_32_ranks_over_peak"],
        "capacity_proxy_cpu_per_call_us": result["capacity"]["proxy_cpu_per_call_us"],
        "capacity_32_ranks_over_floor": result["capacity"]["sweep"][-1].get(
            "ratio_calls_per_s_over_floor", "no floor"),
    })
    # the partitioned small call over the same-CPU floor of the same rounds: with the idle
    # policy held where it could be (root), and without it
    result["partitioned_p50_over_floor"] = part["ratio_p50_over_same_cpu_floor"]
    result["partitioned_idle_policy"] = part["headline_case"]
    result["partitioned_p50_over_floor_no_idle_policy"] = part["cases"]["not_held"].get(
        "ratio_p50_over_same_cpu_floor", "no floor")
    write_result(out_dir, "offload", result)
    return result
