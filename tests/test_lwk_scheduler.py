"""Cooperative scheduler: deterministic interleaving, blocking, idle waits, worker threads."""

from __future__ import annotations

import os
import threading
import time

import pytest

from mckmpi.errors import PartitionError
from mckmpi.lwk.scheduler import (DeadlockError, Event, Scheduler, current_task, join,
                                  sleep_until, yield_)
from mckmpi.lwk.workers import WorkerPool


def test_three_tasks_interleave_round_robin() -> None:
    s = Scheduler()
    log: list[str] = []

    def worker(tag: str, n: int) -> None:
        for i in range(n):
            log.append(f"{tag}{i}")
            yield_()

    s.spawn(worker, "a", 3)
    s.spawn(worker, "b", 2)
    s.spawn(worker, "c", 3)
    s.run()
    assert log == ["a0", "b0", "c0", "a1", "b1", "c1", "a2", "c2"]
    stats = s.stats()
    assert stats["tasks_spawned"] == 3
    assert stats["max_ready"] == 3
    assert stats["switches"] >= 8


def test_method_and_module_yield_are_the_same_queue() -> None:
    s = Scheduler()
    log: list[str] = []

    def a() -> None:
        log.append("a0")
        s.yield_()
        log.append("a1")

    def b() -> None:
        log.append("b0")
        yield_()
        log.append("b1")

    s.spawn(a)
    s.spawn(b)
    s.run()
    assert log == ["a0", "b0", "a1", "b1"]


def test_nested_calls_can_block() -> None:
    s = Scheduler()
    ev = Event("deep")
    log: list[str] = []

    def deep(level: int) -> str:
        if level == 0:
            ev.wait()
            return current_task().name
        return deep(level - 1)

    def setter() -> None:
        log.append("setter")
        ev.set()

    t = s.spawn(deep, 50, name="deep-task")
    s.spawn(setter)
    s.run()
    assert t.result == "deep-task"
    assert log == ["setter"]


def test_join_returns_result_and_reraises() -> None:
    s = Scheduler()

    def child(x: int) -> int:
        yield_()
        return x * 2

    def failing() -> None:
        yield_()
        raise ValueError("boom")

    def main() -> tuple[int, str]:
        ok = s.spawn(child, 21)
        bad = s.spawn(failing, name="bad")
        with pytest.raises(ValueError, match="boom"):
            join(bad)
        return s.join(ok), bad.exception.__class__.__name__

    assert s.run(main) == (42, "ValueError")


def test_run_returns_main_result_and_reraises_unjoined_failure() -> None:
    s = Scheduler()
    s.spawn(lambda: 1 / 0, name="lost")
    with pytest.raises(ZeroDivisionError) as info:
        s.run(lambda: "main result")
    assert "lost" in " ".join(info.value.__notes__)


def test_join_outside_task_needs_finished_task() -> None:
    s = Scheduler()
    t = s.spawn(lambda: 5)
    with pytest.raises(RuntimeError, match="has not finished"):
        s.join(t)
    s.run()
    assert s.join(t) == 5 and t.done


def test_join_deadline_raises_timeout() -> None:
    s = Scheduler()

    def slow() -> None:
        sleep_until(time.monotonic_ns() + 20_000_000)

    def main() -> None:
        t = s.spawn(slow)
        with pytest.raises(TimeoutError):
            join(t, deadline_ns=time.monotonic_ns() + 1_000_000)
        assert not t.done
        join(t)

    s.run(main)


def test_event_wakes_waiters_in_fifo_order() -> None:
    s = Scheduler()
    ev = Event("go")
    woke: list[str] = []

    def waiter(tag: str) -> None:
        ev.wait()
        woke.append(tag)

    def setter() -> None:
        yield_()  # all three waiters are parked by now
        assert not ev.is_set()
        ev.set()
        woke.append("setter")

    for tag in ("w1", "w2", "w3"):
        s.spawn(waiter, tag)
    s.spawn(setter)
    s.run()
    assert woke == ["setter", "w1", "w2", "w3"]
    assert ev.is_set()


def test_event_wait_deadline_times_out_and_leaves_no_waiter() -> None:
    s = Scheduler()
    ev = Event("late")
    results: list[bool] = []

    def waiter() -> None:
        results.append(ev.wait(time.monotonic_ns() + 2_000_000))
        results.append(ev.wait(time.monotonic_ns() + 50_000_000))

    def setter() -> None:
        sleep_until(time.monotonic_ns() + 10_000_000)
        ev.set()

    s.spawn(waiter)
    s.spawn(setter)
    s.run()
    assert results == [False, True]


def test_sleep_until_orders_by_deadline_and_never_wakes_early() -> None:
    s = Scheduler()
    woke: list[tuple[str, int, int]] = []
    base = time.monotonic_ns()

    def sleeper(tag: str, delay_ns: int) -> None:
        deadline = base + delay_ns
        sleep_until(deadline)
        woke.append((tag, deadline, time.monotonic_ns()))

    s.spawn(sleeper, "slow", 8_000_000)
    s.spawn(sleeper, "spin", 30_000)  # below SPIN_NS (50 us): served by spinning
    s.spawn(sleeper, "mid", 3_000_000)
    start = time.monotonic_ns()
    s.run()
    assert [w[0] for w in woke] == ["spin", "mid", "slow"]
    for _, deadline, now in woke:
        assert now >= deadline
    stats = s.stats()
    # Tick-less: one OS wait per sleep at most, not one per tick of some period.
    assert 1 <= stats["idle_waits"] <= 3
    # Nearly all of the run was idle waiting, and it was accounted as such.
    assert stats["idle_ns"] >= 0.5 * (base + 8_000_000 - start)


def test_sleepers_are_served_while_tasks_keep_yielding() -> None:
    s = Scheduler()
    done: list[int] = []

    def spinner() -> None:
        while not done:
            yield_()

    def sleeper() -> None:
        sleep_until(time.monotonic_ns() + 1_000_000)
        done.append(1)

    s.spawn(spinner)
    s.spawn(spinner)
    s.spawn(sleeper)
    s.run()
    assert done == [1]


def test_deadlock_names_blocked_tasks_and_cancels_them() -> None:
    s = Scheduler()
    never = Event("never-set")
    cleaned: list[str] = []

    def stuck() -> None:
        try:
            never.wait()
        finally:
            cleaned.append("stuck")

    def joiner(t: object) -> None:
        join(t)  # type: ignore[arg-type]

    t = s.spawn(stuck, name="stuck")
    s.spawn(joiner, t, name="joiner")
    with pytest.raises(DeadlockError) as info:
        s.run()
    msg = str(info.value)
    assert "'stuck' (waiting on Event 'never-set')" in msg
    assert "'joiner' (waiting on Event \"end of task 'stuck'\")" in msg
    assert cleaned == ["stuck"]
    assert t.cancelled and not t.done


def test_deadlock_points_at_an_earlier_failure() -> None:
    s = Scheduler()
    ev = Event("from-producer")

    def producer() -> None:
        raise OSError("disk gone")

    s.spawn(producer)
    s.spawn(ev.wait, name="consumer")
    with pytest.raises(DeadlockError) as info:
        s.run()
    assert isinstance(info.value.__cause__, OSError)


def test_poller_wakes_a_task() -> None:
    s = Scheduler()
    ev = Event("ring")
    ring: list[int] = []
    polls = 0

    def poll() -> bool:
        nonlocal polls
        polls += 1
        if polls == 5:  # a completion shows up in the "ring" on the fifth poll
            ring.append(7)
            ev.set()
            return True
        return False

    def consumer() -> int:
        ev.wait()
        return ring[0]

    s.add_poller(poll, pending=lambda: not ev.is_set())
    t = s.spawn(consumer)
    s.run()
    assert t.result == 7
    assert polls >= 5
    assert s.stats()["polls"] >= 5


def test_poller_without_pending_work_allows_deadlock_detection() -> None:
    s = Scheduler()
    s.add_poller(lambda: False, pending=lambda: False, notifies=True)
    s.spawn(Event("x").wait, name="w")
    with pytest.raises(DeadlockError, match="'w'"):
        s.run()


def test_blocking_calls_outside_a_task_fail_clearly() -> None:
    with pytest.raises(RuntimeError, match="must come from a task"):
        yield_()
    with pytest.raises(RuntimeError, match="must come from a task"):
        Event().wait()


def _cpus_allowed(tid: int) -> str:
    with open(f"/proc/self/task/{tid}/status") as f:
        for line in f:
            if line.startswith("Cpus_allowed_list:"):
                return line.split(":", 1)[1].strip()
    raise AssertionError("no Cpus_allowed_list")


def test_worker_pool_pins_threads_and_overlaps_with_tasks() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    s = Scheduler()
    ticks: list[int] = []
    gate = threading.Event()

    def blocking_job(x: int) -> tuple[int, int, bool]:
        # Held until the ticker task has run: only possible if waiting on the job
        # blocks the waiting task, not the whole rank.
        opened = gate.wait(10)
        return x * x, threading.get_native_id(), opened

    with WorkerPool(cpus) as pool:
        assert [_cpus_allowed(tid) for tid in pool.native_ids] == [str(c) for c in cpus]

        def ticker() -> None:
            while len(ticks) < 20:
                ticks.append(1)
                yield_()
            gate.set()

        def main() -> list[tuple[int, int, bool]]:
            jobs = [pool.submit(blocking_job, i) for i in range(len(cpus))]
            s.spawn(ticker)
            return [job.result() for job in jobs]

        results = s.run(main)
    assert [r[0] for r in results] == [i * i for i in range(len(cpus))]
    assert {r[1] for r in results} <= set(pool.native_ids)
    assert all(r[2] for r in results)
    assert len(ticks) == 20
    assert s.stats()["idle_waits"] >= 1  # waited for the pool without spinning


def test_worker_pool_reraises_job_exception_and_blocks_outside_tasks() -> None:
    with WorkerPool([sorted(os.sched_getaffinity(0))[0]]) as pool:
        job = pool.submit(int, "not a number")
        with pytest.raises(ValueError):
            job.result()
        assert job.done() and job.cpu == pool.cpus[0]


def test_worker_pool_rejects_cpus_outside_affinity() -> None:
    with pytest.raises(PartitionError, match="outside"):
        WorkerPool([max(os.sched_getaffinity(0)) + 64])
