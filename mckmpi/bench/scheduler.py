"""Benchmark: the cost of one task switch in the LWK scheduler, against in-run baselines.

Two tasks ping-pong with `yield_` for 10^6 switches (10^5 with `quick`). Baselines, measured
in the same run and interleaved with it so machine drift hits all variants alike:
- a plain generator round robin doing the same switches (the cheapest cooperative switch
  Python has, but stackless: it cannot block from a nested call);
- raw `greenlet.switch` ping-pong (the stack switch the scheduler is built on), so the
  ratio shows what the scheduler's bookkeeping adds.
"""

from __future__ import annotations

import gc
import os
import pathlib
import platform
import statistics
import time
from collections import deque
from typing import Callable, Iterator

import greenlet

from mckmpi.bench import write_result
from mckmpi.lwk.scheduler import Scheduler, yield_


def _scheduler(n: int, use_method: bool) -> tuple[int, int]:
    sched = Scheduler()
    step = sched.yield_ if use_method else yield_
    half = n // 2

    def pinger() -> None:
        for _ in range(half):
            step()

    sched.spawn(pinger)
    sched.spawn(pinger)
    t0 = time.perf_counter_ns()
    sched.run()
    elapsed = time.perf_counter_ns() - t0
    return elapsed, sched.stats()["switches"]


def _generators(n: int) -> tuple[int, int]:
    def pinger(count: int) -> Iterator[None]:
        for _ in range(count):
            yield

    ready = deque([pinger(n // 2), pinger(n // 2)])
    switches = 0
    t0 = time.perf_counter_ns()
    while ready:
        gen = ready.popleft()
        switches += 1
        try:
            next(gen)
        except StopIteration:
            continue
        ready.append(gen)
    return time.perf_counter_ns() - t0, switches


def _greenlets(n: int) -> tuple[int, int]:
    half = n // 2

    def ping() -> None:
        for _ in range(half):
            g_pong.switch()

    def pong() -> None:
        for _ in range(half):
            g_ping.switch()

    g_ping = greenlet.greenlet(ping)
    g_pong = greenlet.greenlet(pong)
    t0 = time.perf_counter_ns()
    g_ping.switch()
    elapsed = time.perf_counter_ns() - t0
    g_pong.throw()  # left suspended by the last switch of ping; unwind it
    return elapsed, 2 * half


def run(out_dir: pathlib.Path, quick: bool = False) -> dict:
    """Measure ns per switch for the scheduler and both baselines; write bench-scheduler.json."""
    n = 10**5 if quick else 10**6
    repeats = 3 if quick else 5
    variants: dict[str, Callable[[], tuple[int, int]]] = {
        "scheduler": lambda: _scheduler(n, use_method=False),
        "scheduler_method": lambda: _scheduler(n, use_method=True),
        "generator": lambda: _generators(n),
        "greenlet": lambda: _greenlets(n),
    }
    samples: dict[str, list[float]] = {name: [] for name in variants}
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside a timed loop would be measured as switch cost
    try:
        for _ in range(repeats):
            for name, variant in variants.items():
                elapsed, switches = variant()
                samples[name].append(elapsed / switches)
    finally:
        if gc_was_enabled:
            gc.enable()
    ns = {name: statistics.median(values) for name, values in samples.items()}
    result = {
        "benchmark": "scheduler",
        "quick": quick,
        "switches_per_sample": n,
        "repeats": repeats,
        "statistic": "median ns per switch over repeats",
        "scheduler_ns_per_switch": ns["scheduler"],
        "scheduler_method_ns_per_switch": ns["scheduler_method"],
        "baseline_generator_ns_per_switch": ns["generator"],
        "baseline_greenlet_ns_per_switch": ns["greenlet"],
        "ratio_scheduler_vs_generator": ns["scheduler"] / ns["generator"],
        "ratio_scheduler_vs_greenlet": ns["scheduler"] / ns["greenlet"],
        "samples_ns_per_switch": samples,
        "python": platform.python_version(),
        "greenlet": greenlet.__version__,
        "cpus": sorted(os.sched_getaffinity(0)),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_result(out_dir, "scheduler", result)
    return result
