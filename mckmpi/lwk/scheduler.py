"""Cooperative, round-robin, tick-less scheduler of tasks inside one rank.

McKernel's LWK scheduler never preempts: a thread keeps its core until it blocks or yields,
and an idle core sleeps until the next event instead of taking a periodic timer tick. This
module gives a rank the same discipline in user space. Tasks are greenlets (stackful), so a
task can block from any call depth -- e.g. deep inside a library waiting for an offloaded
system call -- without every caller being a coroutine.

Guarantees:
- switches happen only at `yield_`, `sleep_until`, `Event.wait`, `join` and task end; no
  timer, no signal, no hidden thread;
- the ready queue is FIFO, so the interleaving of a program is deterministic;
- an idle scheduler waits for the earliest deadline with one OS wake-up (short waits spin);
- a program where every task waits on something nothing can deliver fails with
  `DeadlockError` naming the blocked tasks instead of hanging.

External completion sources (a shared-memory completion ring, a `WorkerPool`) are polled
through `Scheduler.add_poller`. All scheduler objects belong to the OS thread that runs the
scheduler; other threads may only call `Scheduler.notify`.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque
from typing import Any, Callable

import greenlet


#: Waits shorter than this spin on the monotonic clock: an OS sleep would overshoot them.
SPIN_NS = 50_000


class DeadlockError(RuntimeError):
    """Every live task waits for something that no task, sleeper or poller can deliver."""


class Event:
    """A one-shot flag tasks can wait on; `set` wakes the waiters in the order they waited.

    Only the scheduler's own thread may call `set` (from a task or a poller): completions
    produced by other threads reach the scheduler through a poller.
    """

    __slots__ = ("name", "_flag", "_waiters")

    def __init__(self, name: str | None = None) -> None:
        self.name = name
        self._flag = False
        self._waiters: deque[tuple[Task, int]] = deque()

    def __repr__(self) -> str:
        return f"Event {self.name!r}" if self.name else f"Event at {id(self):#x}"

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        """Set the flag and make every waiter ready, first waiter first."""
        self._flag = True
        waiters, self._waiters = self._waiters, deque()
        for task, wait_id in waiters:
            task._sched._wake(task, wait_id, False)

    def clear(self) -> None:
        self._flag = False

    def wait(self, deadline_ns: int | None = None) -> bool:
        """Block the calling task until the flag is set; False if `deadline_ns` passed first."""
        if self._flag:
            return True
        task, sched = _running()
        wait_id = sched._block(task, self, deadline_ns)
        self._waiters.append((task, wait_id))
        sched._switch()
        if task._timed_out:
            if (task, wait_id) in self._waiters:
                self._waiters.remove((task, wait_id))
            return self._flag
        return True


class Task:
    """A unit of work scheduled cooperatively; `result`/`exception` are valid once `done`."""

    __slots__ = ("name", "result", "exception", "done", "cancelled", "_sched", "_fn",
                 "_glet", "_wait_id", "_timed_out", "_blocked_on", "_end", "_retrieved")

    def __init__(self, sched: Scheduler, fn: Callable[..., Any], name: str) -> None:
        self.name = name
        self.result: Any = None
        self.exception: BaseException | None = None
        self.done = False
        self.cancelled = False
        self._sched = sched
        self._fn: Callable[[], Any] | None = fn
        self._glet: _TaskGreenlet | None = None
        self._wait_id = 0
        self._timed_out = False
        self._blocked_on: Event | str | None = None
        self._end = Event(f"end of task {name!r}")
        self._retrieved = False

    def __repr__(self) -> str:
        state = "done" if self.done else "cancelled" if self.cancelled else "live"
        return f"<Task {self.name!r} {state}>"

    def _describe(self) -> str:
        what = self._blocked_on
        return f"{self.name!r} ({'waiting on ' + repr(what) if isinstance(what, Event) else what})"


class _TaskGreenlet(greenlet.greenlet):
    """The stack of one task; knows its task so module-level calls find their scheduler."""

    def __init__(self, task: Task, parent: greenlet.greenlet) -> None:
        super().__init__(parent=parent)
        self.task = task

    def run(self) -> None:
        self.task._sched._run_task(self.task)


class _Poller:
    __slots__ = ("poll", "pending", "notifies")

    def __init__(self, poll: Callable[[], bool], pending: Callable[[], bool] | None,
                 notifies: bool) -> None:
        self.poll = poll
        self.pending = pending
        self.notifies = notifies


def _running() -> tuple[Task, Scheduler]:
    task = getattr(greenlet.getcurrent(), "task", None)
    if task is None:
        raise RuntimeError("this call blocks, so it must come from a task run by Scheduler.run()")
    return task, task._sched


def current_scheduler() -> Scheduler | None:
    """The scheduler of the running task, None outside a task (the caller may block its
    OS thread instead)."""
    task = getattr(greenlet.getcurrent(), "task", None)
    return None if task is None else task._sched


def current_task() -> Task:
    """The task running now (RuntimeError outside a task)."""
    return _running()[0]


def yield_() -> None:
    """Give the CPU to the next ready task of the calling task's scheduler."""
    task = getattr(greenlet.getcurrent(), "task", None)
    if task is None:
        _running()  # raises the explanation
    task._sched.yield_()


def sleep_until(t_ns: int) -> None:
    """Block the calling task until `time.monotonic_ns() >= t_ns`."""
    _running()[1].sleep_until(t_ns)


def join(task: Task, deadline_ns: int | None = None) -> Any:
    """Wait for `task` to end; return its result or re-raise its exception."""
    return task._sched.join(task, deadline_ns)


class Scheduler:
    """Round-robin scheduler of the tasks of one OS thread; see the module docstring."""

    def __init__(self) -> None:
        self._ready: deque[Task] = deque()
        self._sleepers: list[tuple[int, int, Task]] = []
        self._pollers: list[_Poller] = []
        self._live: dict[int, Task] = {}
        self._failed: list[Task] = []
        self._current: Task | None = None
        self._hub: greenlet.greenlet | None = None
        self._wait_ids = itertools.count(1)
        self._wakeup = threading.Event()
        self._poll_countdown = 0
        self._switches = 0
        self._spawned = 0
        self._max_ready = 0
        self._idle_ns = 0
        self._idle_waits = 0
        self._polls = 0

    # -- public API -------------------------------------------------------------------------

    def spawn(self, fn: Callable[..., Any], *args: Any, name: str | None = None,
              **kwargs: Any) -> Task:
        """Create a task running `fn(*args, **kwargs)`; it is queued behind the ready tasks."""
        self._spawned += 1
        task = Task(self, (lambda: fn(*args, **kwargs)) if args or kwargs else fn,
                    name or f"task-{self._spawned}")
        task._glet = _TaskGreenlet(task, greenlet.getcurrent() if self._hub is None else self._hub)
        self._live[id(task)] = task
        self._make_ready(task)
        return task

    def yield_(self) -> None:
        """Put the running task at the tail of the ready queue and run the head."""
        cur = self._current
        if cur is None:
            raise RuntimeError("yield_() must be called from a task run by Scheduler.run()")
        ready = self._ready
        if self._sleepers or self._pollers:
            ready.append(cur)
            self._switch()
        elif ready:  # the hot path: hand the CPU straight to the head of the queue
            nxt = ready.popleft()
            ready.append(cur)
            self._current = nxt
            self._switches += 1
            nxt._glet.switch()  # type: ignore[union-attr]

    def sleep_until(self, t_ns: int) -> None:
        """Block the running task until the monotonic clock reaches `t_ns` (never earlier)."""
        task = self._current
        if task is None:
            raise RuntimeError("sleep_until() must be called from a task run by Scheduler.run()")
        self._block(task, f"sleeping until {t_ns} ns", t_ns)
        self._switch()

    def join(self, task: Task, deadline_ns: int | None = None) -> Any:
        """Wait for `task` to end and return its result or re-raise its exception.

        Outside a task only a finished task can be joined. TimeoutError if `deadline_ns`
        (monotonic ns) passes first.
        """
        if not task.done:
            if task is self._current:
                raise RuntimeError(f"task {task.name!r} cannot join itself")
            if self._current is None:
                raise RuntimeError(f"task {task.name!r} has not finished; join it from a task "
                                   "or after Scheduler.run()")
            if not task._end.wait(deadline_ns):
                raise TimeoutError(f"task {task.name!r} did not finish by the deadline")
        task._retrieved = True
        if task.exception is not None:
            raise task.exception
        return task.result

    def add_poller(self, poll: Callable[[], bool], *, pending: Callable[[], bool] | None = None,
                   notifies: bool = False) -> None:
        """Register an external completion source, polled when no task is ready.

        `poll()` makes the tasks it completes ready (e.g. sets their `Event`) and returns True
        if it did. `pending()` says whether the source may still complete something; without
        it the source is assumed always pending, so no deadlock can be declared while it is
        registered. A source that calls `notify()` from its thread after each completion
        (`notifies=True`) lets an idle scheduler block instead of spinning on it.
        """
        self._pollers.append(_Poller(poll, pending, notifies))
        self._poll_countdown = 0

    def remove_poller(self, poll: Callable[[], bool]) -> None:
        self._pollers = [p for p in self._pollers if p.poll is not poll]

    def notify(self) -> None:
        """Wake an idle scheduler to run its pollers; the one call safe from any thread."""
        self._wakeup.set()

    def run(self, main_fn: Callable[[], Any] | None = None) -> Any:
        """Run until every task has ended; return `main_fn`'s result if one was given.

        A task exception that nobody joined is re-raised here (errors never pass silently).
        If `run` ends abnormally the remaining tasks are cancelled (their `finally` blocks run).
        """
        if self._hub is not None:
            raise RuntimeError("Scheduler.run() is already running")
        main = self.spawn(main_fn, name="main") if main_fn is not None else None
        self._hub = greenlet.getcurrent()
        for task in self._live.values():
            if task._glet is not None and not task._glet:
                task._glet.parent = self._hub
        completed = False
        try:
            self._loop()
            completed = True
        finally:
            if not completed:
                self._cancel_all()
            self._hub = None
            self._current = None
        failed, self._failed = self._failed, []
        result = self.join(main) if main is not None else None
        for task in failed:
            if not task._retrieved:
                task._retrieved = True
                task.exception.add_note(  # type: ignore[union-attr]
                    f"raised in task {task.name!r}, which nobody joined")
                raise task.exception  # type: ignore[misc]
        return result

    def stats(self) -> dict[str, int]:
        """Counters since creation: task switches, spawns, longest ready queue, idle time."""
        return {
            "switches": self._switches,
            "tasks_spawned": self._spawned,
            "max_ready": self._max_ready,
            "idle_ns": self._idle_ns,
            "idle_waits": self._idle_waits,
            "polls": self._polls,
        }

    # -- internals --------------------------------------------------------------------------

    def _make_ready(self, task: Task) -> None:
        ready = self._ready
        ready.append(task)
        if len(ready) > self._max_ready:
            self._max_ready = len(ready)

    def _block(self, task: Task, on: Event | str, deadline_ns: int | None) -> int:
        """Record what `task` waits for; returns the id that a wake-up must present."""
        wait_id = next(self._wait_ids)
        task._wait_id = wait_id
        task._timed_out = False
        task._blocked_on = on
        if deadline_ns is not None:
            heapq.heappush(self._sleepers, (deadline_ns, wait_id, task))
        return wait_id

    def _wake(self, task: Task, wait_id: int, timed_out: bool) -> None:
        if task._wait_id != wait_id:
            return  # stale: the task was already woken by the other half of a timed wait
        task._wait_id = 0
        task._timed_out = timed_out
        task._blocked_on = None
        self._make_ready(task)

    def _housekeep(self) -> None:
        """Keep sleepers and pollers served while tasks keep yielding to each other."""
        if self._sleepers:
            now = time.monotonic_ns()
            if now >= self._sleepers[0][0]:
                self._expire(now)
        if self._pollers:
            self._poll_countdown -= 1
            if self._poll_countdown <= 0:
                self._poll()

    def _switch(self) -> None:
        """Run the head of the ready queue; the caller already queued or parked itself."""
        if self._sleepers or self._pollers:
            self._housekeep()
        ready = self._ready
        if not ready:
            self._current = None
            self._hub.switch()  # type: ignore[union-attr]
            return
        nxt = ready.popleft()
        if nxt is self._current:
            return
        self._current = nxt
        self._switches += 1
        nxt._glet.switch()  # type: ignore[union-attr]

    def _loop(self) -> None:
        ready = self._ready
        while self._live:
            if self._sleepers or self._pollers:
                self._housekeep()
            if not ready:
                self._idle()
                continue
            nxt = ready.popleft()
            self._current = nxt
            self._switches += 1
            nxt._glet.switch()  # type: ignore[union-attr]
            self._current = None

    def _run_task(self, task: Task) -> None:
        try:
            task.result = task._fn()  # type: ignore[misc]
        except Exception as exc:  # delivered by join() or re-raised by run()
            task.exception = exc
            self._failed.append(task)
        task.done = True
        task._fn = task._glet = None  # no reference cycle left for a frozen GC to keep
        del self._live[id(task)]
        task._end.set()
        self._current = None

    def _expire(self, now: int) -> None:
        sleepers = self._sleepers
        while sleepers and sleepers[0][0] <= now:
            _, wait_id, task = heapq.heappop(sleepers)
            self._wake(task, wait_id, True)

    def _poll(self) -> bool:
        self._polls += 1
        woke = False
        for p in self._pollers:
            if p.poll():
                woke = True
        self._poll_countdown = len(self._ready) + 1
        return woke

    def _idle(self) -> None:
        """No task is ready: poll, then wait for the earliest deadline with one wake-up."""
        t0 = time.monotonic_ns()
        ready = self._ready
        sleepers = self._sleepers
        try:
            while not ready:
                self._wakeup.clear()
                if self._pollers and (self._poll() or ready):
                    break
                while sleepers and sleepers[0][2]._wait_id != sleepers[0][1]:
                    heapq.heappop(sleepers)  # stale half of a timed wait that was satisfied
                now = time.monotonic_ns()
                if sleepers and sleepers[0][0] <= now:
                    self._expire(now)
                    continue
                pending = [p for p in self._pollers if p.pending is None or p.pending()]
                if not sleepers and not pending:
                    raise self._deadlock()
                if any(not p.notifies for p in pending):
                    continue  # a source that cannot notify must be spun on
                # Sleep to SPIN_NS before the deadline and spin the rest: one OS wake-up,
                # and the sleep's overshoot (timer slack) does not delay the task.
                timeout = (sleepers[0][0] - now - SPIN_NS) / 1e9 if sleepers else None
                if timeout is not None and timeout <= 0:
                    continue
                self._idle_waits += 1
                if pending:
                    self._wakeup.wait(timeout)
                else:
                    time.sleep(timeout)  # type: ignore[arg-type]
        finally:
            self._idle_ns += time.monotonic_ns() - t0

    def _deadlock(self) -> DeadlockError:
        blocked = ", ".join(t._describe() for t in self._live.values())
        err = DeadlockError(f"deadlock: every task is blocked and nothing can wake them: "
                            f"{blocked}")
        failed = [t for t in self._failed if not t._retrieved]
        if failed:
            err.add_note(f"task {failed[0].name!r} failed earlier with "
                         f"{type(failed[0].exception).__name__}: {failed[0].exception}")
            err.__cause__ = failed[0].exception
        return err

    def _cancel_all(self) -> None:
        """Unwind every unfinished task so its `finally` blocks run."""
        self._ready.clear()
        self._sleepers.clear()
        for task in list(self._live.values()):
            task.cancelled = True
            glet = task._glet
            if glet:  # started and not dead
                glet.throw()
        self._live.clear()
