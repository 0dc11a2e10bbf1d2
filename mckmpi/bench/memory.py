"""Benchmark of the LWK arena against numpy's default allocation, measured in the same run.

Three questions, each with its baseline:

* page faults: allocating and first-writing arrays of 4 KiB .. 256 MiB from a booted arena
  versus `numpy.empty` + the same write (getrusage minor faults);
* time to a usable 64 MiB array (allocate + first full write), arena versus numpy; numpy also
  without its huge-page advice, which shows what the 4 KiB faults and zeroing cost;
* TLSF alloc/free latency over random sizes with the GC frozen and disabled, next to a
  fixed-work operation of the same median duration timed by the same loop: the tail that the
  fixed work also shows comes from the machine (interrupts, other tenants), not from the
  allocator.
"""

from __future__ import annotations

import array
import gc
import os
import platform
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mckmpi.bench import write_result
from mckmpi.lwk.arena import Arena
from mckmpi.lwk.tlsf import Allocator
from mckmpi.node.host import THP, sysfs_choice
from mckmpi.lwk.quiet import QuietState

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
SIZES = [4 * KiB * 4**k for k in range(9)]  # 4 KiB .. 256 MiB
USABLE_BYTES = 64 * MiB
LATENCY_GOAL_US = 50.0
RATIO_GOAL = 0.5
POOL = 4096  # most live blocks in the allocator latency test

# Allocates and first-writes every size between two getppid() markers, under strace.
_STRACED = """
import os, sys
from mckmpi.lwk.arena import Arena
sizes = [int(arg) for arg in sys.argv[1:]]
with Arena(max(sizes) + (64 << 20)) as arena:
    arena.free(arena.empty(16))
    os.getppid()
    for nbytes in sizes:
        a = arena.empty(nbytes // 8)
        a.fill(1.0)
        arena.free(a)
        del a
    os.getppid()
"""


def _minflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _numpy_hugepage_advice(enabled: bool) -> bool:
    """Switch numpy's MADV_HUGEPAGE on large allocations; return the previous setting."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray  # type: ignore[no-redef]

    return bool(multiarray._set_madvise_hugepage(enabled))


def _usable(make: Callable[[int], np.ndarray], nbytes: int,
            release: Callable[[np.ndarray], None]) -> tuple[int, int]:
    """(ns, minor faults) to allocate `nbytes` of float64 and write every element once."""
    f0 = _minflt()
    t0 = time.perf_counter_ns()
    a = make(nbytes // 8)
    a.fill(1.0)
    t1 = time.perf_counter_ns()
    faults = _minflt() - f0
    release(a)
    return t1 - t0, faults


def _page_faults(arena: Arena, reps: int) -> list[dict[str, Any]]:
    rows = []
    for nbytes in SIZES:
        arena_runs = [_usable(arena.empty, nbytes, arena.free) for _ in range(reps)]
        numpy_runs = [_usable(np.empty, nbytes, lambda a: None) for _ in range(reps)]
        rows.append({
            "bytes": nbytes,
            "arena_minflt": [f for _, f in arena_runs],
            "numpy_minflt": [f for _, f in numpy_runs],
            "arena_ns_median": statistics.median(t for t, _ in arena_runs),
            "numpy_ns_median": statistics.median(t for t, _ in numpy_runs),
        })
    return rows


def _syscalls_in_hot_path() -> dict[str, Any]:
    """System calls made by the allocating thread between boot and the last first-write."""
    strace = shutil.which("strace")
    if strace is None:
        return {"measured": False, "reason": "strace is not installed"}
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "strace.log"
        done = subprocess.run([strace, "-f", "-qq", "-o", str(log), sys.executable, "-c",
                               _STRACED, *map(str, SIZES)],
                              capture_output=True, text=True, timeout=300)
        lines = log.read_text().splitlines() if log.exists() else []
    marks = [i for i, line in enumerate(lines) if re.match(r"\d+ +getppid\(\)", line)]
    if done.returncode != 0 or len(marks) != 2:
        reason = (done.stderr.strip().splitlines() or ["no markers in the trace"])[-1]
        return {"measured": False, "reason": reason}
    pid = lines[marks[0]].split()[0]
    calls = [line for line in lines[marks[0] + 1:marks[1]] if line.split(None, 1)[0] == pid]
    return {"measured": True, "tool": "strace -f", "sizes": SIZES, "syscalls": len(calls),
            "first_calls": calls[:10]}


def _time_to_usable(arena: Arena, reps: int) -> dict[str, Any]:
    """Interleaved reps of arena, numpy and numpy without huge-page advice, 64 MiB each."""
    runs: dict[str, list[tuple[int, int]]] = {"arena": [], "numpy": [], "numpy_4k": []}
    for _ in range(reps):
        runs["arena"].append(_usable(arena.empty, USABLE_BYTES, arena.free))
        runs["numpy"].append(_usable(np.empty, USABLE_BYTES, lambda a: None))
        previous = _numpy_hugepage_advice(False)
        try:
            runs["numpy_4k"].append(_usable(np.empty, USABLE_BYTES, lambda a: None))
        finally:
            _numpy_hugepage_advice(previous)
    result: dict[str, Any] = {"bytes": USABLE_BYTES, "reps": reps,
                              "write": "ndarray.fill(1.0) of float64"}
    for name, values in runs.items():
        result[name] = {"ms_median": statistics.median(t for t, _ in values) / 1e6,
                        "ms_min": min(t for t, _ in values) / 1e6,
                        "minflt_median": statistics.median(f for _, f in values)}
    arena_ms = result["arena"]["ms_median"]
    result["ratio_arena_over_numpy"] = arena_ms / result["numpy"]["ms_median"]
    result["ratio_arena_over_numpy_4k"] = arena_ms / result["numpy_4k"]["ms_median"]
    result["goal_ratio_le"] = RATIO_GOAL
    result["goal_met"] = result["ratio_arena_over_numpy"] <= RATIO_GOAL
    return result


def _percentiles(samples: array.array) -> dict[str, float]:
    ordered = sorted(samples)
    n = len(ordered)
    over = sum(1 for t in ordered if t > LATENCY_GOAL_US * 1000)
    return {"ops": n,
            "p50_us": ordered[n // 2] / 1000,
            "p99_us": ordered[min(n - 1, int(n * 0.99))] / 1000,
            "p99_9_us": ordered[min(n - 1, int(n * 0.999))] / 1000,
            "max_us": ordered[-1] / 1000,
            "over_goal": over}


def _timed_loop(ops: int, seed: int, alloc: Callable[[int], int],
                free: Callable[[int], None]) -> tuple[array.array, array.array, dict[str, int]]:
    """Random interleaving over a pool of live blocks; per-op ns and the kind of each op."""
    rng = random.Random(seed)
    sizes = [int(64 * 2 ** (rng.random() * 14)) for _ in range(ops)]  # 64 B .. 1 MiB
    coins = [rng.random() * POOL for _ in range(ops)]
    picks = [rng.random() for _ in range(ops)]
    live = [0] * POOL  # preallocated: the loop itself must not grow a list
    count = 0
    lat = array.array("q", bytes(8 * ops))
    kinds = array.array("b", bytes(ops))  # 0 alloc, 1 free
    clock = time.perf_counter_ns
    was_enabled = gc.isenabled()
    gc.collect()
    gc.freeze()
    gc.disable()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    try:
        for i in range(ops):
            if coins[i] < count:  # free with probability live/POOL: the pool hovers at POOL/2
                j = int(picks[i] * count)
                count -= 1
                h = live[j]
                live[j] = live[count]
                t0 = clock()
                free(h)
                t1 = clock()
                kinds[i] = 1
            else:
                t0 = clock()
                h = alloc(sizes[i])
                t1 = clock()
                live[count] = h
                count += 1
            lat[i] = t1 - t0
    finally:
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        gc.unfreeze()
        if was_enabled:
            gc.enable()
    for h in live[:count]:
        free(h)
    return lat, kinds, {"minflt": r1.ru_minflt - r0.ru_minflt,
                        "involuntary_context_switches": r1.ru_nivcsw - r0.ru_nivcsw}


def _allocator_latency(ops: int) -> dict[str, Any]:
    """Timed as an LWK rank runs by default: pinned to the last CPU (the other CPUs play the
    Linux cores), SCHED_OTHER (under SCHED_FIFO, RT throttling would put a 50 ms hole into
    every second whenever another task waits for that CPU; see `mckmpi bench noise`)."""
    heap = Allocator(8 * GiB, capacity=65536)  # POOL live blocks of <= 1 MiB always fit
    cpus = sorted(os.sched_getaffinity(0))
    with QuietState() as quiet:
        if len(cpus) > 1:
            os.sched_setaffinity(0, cpus[-1:])
        try:
            _, _, warmup = _timed_loop(ops // 10, 0, heap.alloc, heap.free)
            lat, kinds, counters = _timed_loop(ops, 1, heap.alloc, heap.free)
            fixed = _fixed_work(statistics.median(lat))
            floor, _, floor_counters = _timed_loop(ops, 2, fixed, fixed)
        finally:
            os.sched_setaffinity(0, cpus)
        governed = {"cpu": cpus[-1], "policy": quiet.policy,
                    "policy_reason": quiet.policy_reason}
    allocs = array.array("q", (t for t, k in zip(lat, kinds, strict=True) if k == 0))
    frees = array.array("q", (t for t, k in zip(lat, kinds, strict=True) if k == 1))
    result: dict[str, Any] = {
        "allocator": "tlsf",
        "heap_bytes": heap.size,
        "sizes": "log-uniform 64 B .. 1 MiB",
        "pattern": f"free a random live block with probability live/{POOL}, else allocate "
                   f"(the pool hovers around {POOL // 2} live blocks)",
        "gc": "frozen and disabled during the timed loop",
        "timer": "time.perf_counter_ns around each call (its overhead included)",
        "all": _percentiles(lat),
        "alloc": _percentiles(allocs),
        "free": _percentiles(frees),
        **counters,
        "warmup": {"ops": ops // 10, "what": "same pattern, untimed: grows the interpreter's "
                   "heap to its working size (the ints the allocator stores)", **warmup},
        "heap_after": heap.stats(),
        "goal_max_us": LATENCY_GOAL_US,
        "governed_as_lwk_rank": governed,
    }
    result["goal_met"] = result["all"]["max_us"] <= LATENCY_GOAL_US
    # Baseline: fixed work with the allocator's median duration, through the same loop.
    result["fixed_work_baseline"] = {"what": "a constant pure-Python loop timed like the "
                                             "allocator, calibrated to its median",
                                     **_percentiles(floor), **floor_counters}
    return result


def _fixed_work(target_ns: float) -> Callable[[int], int]:
    """A one-argument function doing a fixed amount of Python work for about `target_ns`."""
    iterations = 100_000

    def fixed(_: int) -> int:
        x = 0
        for i in range(iterations):
            x += i
        return x

    t0 = time.perf_counter_ns()
    fixed(0)
    per_iteration = (time.perf_counter_ns() - t0) / iterations
    iterations = max(1, round(target_ns / per_iteration))  # `fixed` sees the new count
    return fixed


def _array_api(arena: Arena, batches: int, per_batch: int) -> dict[str, Any]:
    """ns per (create + drop) of a small float64 array: arena versus numpy."""
    def per_op(make: Callable[[int], np.ndarray]) -> float:
        times = []
        for _ in range(batches):
            t0 = time.perf_counter_ns()
            for _ in range(per_batch):
                make(128)
            times.append((time.perf_counter_ns() - t0) / per_batch)
        return statistics.median(times)

    arena_ns, numpy_ns = per_op(arena.empty), per_op(np.empty)
    return {"elements": 128, "dtype": "float64", "arena_ns": arena_ns, "numpy_ns": numpy_ns,
            "ratio": arena_ns / numpy_ns}


def run(out_dir: Path, quick: bool = False) -> dict:
    """Run the memory benchmark; write and return bench-memory.json's content."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reps = 3 if quick else 5
    result: dict[str, Any] = {
        "benchmark": "memory",
        "quick": quick,
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": os.getloadavg()[0],
        "thp_enabled": sysfs_choice(f"{THP}/enabled"),
        "thp_shmem_enabled": sysfs_choice(f"{THP}/shmem_enabled"),
    }
    with Arena(max(SIZES) + 64 * MiB) as arena:
        result["arena_boot"] = arena.stats()
        result["page_faults"] = _page_faults(arena, reps)
        result["time_to_usable"] = _time_to_usable(arena, 5 if quick else 11)
        result["array_api"] = _array_api(arena, reps, 2_000 if quick else 20_000)
        result["arena_after"] = arena.stats()
    result["allocator_latency"] = latency = _allocator_latency(10**5 if quick else 10**6)
    result["syscall_trace"] = trace = _syscalls_in_hot_path()
    usable = result["time_to_usable"]
    result.update({  # the headline scalars, at the top level where `mckmpi bench` prints them
        "arena_minflt_max": max(max(row["arena_minflt"]) for row in result["page_faults"]),
        "numpy_minflt_max": max(max(row["numpy_minflt"]) for row in result["page_faults"]),
        "arena_syscalls": trace["syscalls"] if trace["measured"] else "not measured",
        "usable_64mib_ratio": usable["ratio_arena_over_numpy"],
        "usable_64mib_ratio_vs_numpy_4k": usable["ratio_arena_over_numpy_4k"],
        "usable_goal_met": usable["goal_met"],
        "alloc_free_p50_us": latency["all"]["p50_us"],
        "alloc_free_p99_9_us": latency["all"]["p99_9_us"],
        "alloc_free_max_us": latency["all"]["max_us"],
        "alloc_free_ops_over_50us": latency["all"]["over_goal"],
        "fixed_work_ops_over_50us": latency["fixed_work_baseline"]["over_goal"],
        "latency_goal_met": latency["goal_met"],
    })
    write_result(out_dir, "memory", result)
    return result
