"""Worker threads for ranks that own several LWK cores, polled by the rank's scheduler.

A `WorkerPool` pins one OS thread to each extra core; a scheduler task that waits for a
`WorkerJob` blocks only itself, because the pool's completions reach the scheduler through
a notifying poller (see `Scheduler.add_poller`).
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from typing import Any, Callable

from mckmpi.errors import PartitionError
from mckmpi.lwk.scheduler import Event, Scheduler, current_scheduler


class WorkerJob:
    """Future-like handle of a call running on a `WorkerPool` thread."""

    __slots__ = ("cpu", "_pool", "_fn", "_result", "_exception", "_finished", "_event")

    def __init__(self, pool: WorkerPool, fn: Callable[[], Any]) -> None:
        self.cpu: int | None = None
        self._pool = pool
        self._fn = fn
        self._result: Any = None
        self._exception: BaseException | None = None
        self._finished = threading.Event()
        self._event = Event("worker job")

    def done(self) -> bool:
        return self._finished.is_set()

    def result(self) -> Any:
        """Wait for the call and return its value or re-raise its exception.

        From a scheduler task the wait blocks only that task: the pool is polled by the
        scheduler. Outside a task it blocks the OS thread.
        """
        if not self._finished.is_set():
            sched = current_scheduler()
            if sched is None:
                self._finished.wait()
            else:
                self._pool.attach(sched)
                while not self._finished.is_set():
                    self._event.wait()
        if self._exception is not None:
            raise self._exception
        return self._result


class WorkerPool:
    """One OS thread per CPU, each pinned to its CPU, for ranks that own several LWK cores.

    The threads run numpy-style work that releases the GIL; their completions reach the
    scheduler through a notifying poller, so a task waiting on a `WorkerJob` blocks only itself and
    an idle scheduler sleeps instead of spinning. One pool serves one scheduler.
    """

    def __init__(self, cpus: list[int], start_timeout_s: float = 10.0) -> None:
        allowed = os.sched_getaffinity(0)
        if not cpus:
            raise PartitionError("WorkerPool needs at least one CPU")
        if len(set(cpus)) != len(cpus):
            raise PartitionError(f"WorkerPool CPUs repeat: {cpus}")
        outside = sorted(set(cpus) - allowed)
        if outside:
            raise PartitionError(f"WorkerPool CPUs {outside} are outside this process's "
                                 f"affinity {sorted(allowed)}")
        self.cpus = list(cpus)
        self.native_ids: list[int] = [0] * len(cpus)
        self._jobs: queue.SimpleQueue[WorkerJob | None] = queue.SimpleQueue()
        self._completed: deque[WorkerJob] = deque()
        self._outstanding = 0
        self._sched: Scheduler | None = None
        self._errors: list[str] = []
        self._ready = threading.Barrier(len(cpus) + 1)
        self._threads = [threading.Thread(target=self._worker, args=(i, cpu),
                                          name=f"mckmpi-worker-cpu{cpu}", daemon=True)
                         for i, cpu in enumerate(cpus)]
        for t in self._threads:
            t.start()
        try:
            self._ready.wait(start_timeout_s)
        except threading.BrokenBarrierError:
            self._errors.append(f"workers did not start within {start_timeout_s} s")
        if self._errors:
            self.close()
            raise PartitionError(f"WorkerPool: {self._errors[0]}")

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> WorkerJob:
        """Queue `fn(*args, **kwargs)` for the first free worker."""
        if not self._threads:
            raise RuntimeError("WorkerPool is closed")
        job = WorkerJob(self, (lambda: fn(*args, **kwargs)) if args or kwargs else fn)
        self._outstanding += 1
        self._jobs.put(job)
        return job

    def attach(self, sched: Scheduler) -> None:
        """Let `sched` poll this pool (done on the first wait from one of its tasks)."""
        if self._sched is sched:
            return
        if self._sched is not None:
            raise RuntimeError("a WorkerPool serves one scheduler; it is attached to another")
        self._sched = sched
        sched.add_poller(self._poll, pending=self._pending, notifies=True)

    def close(self) -> None:
        """Finish the queued jobs, stop the threads and detach from the scheduler."""
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join()
        self._threads = []
        self._poll()  # completions that arrived after the last poll still wake their waiters
        if self._sched is not None:
            self._sched.remove_poller(self._poll)
            self._sched = None

    def _pending(self) -> bool:
        return self._outstanding > 0

    def _poll(self) -> bool:
        completed = self._completed
        woke = False
        while completed:
            job = completed.popleft()
            self._outstanding -= 1
            job._event.set()
            woke = True
        return woke

    def _worker(self, index: int, cpu: int) -> None:
        tid = threading.get_native_id()
        try:
            os.sched_setaffinity(tid, {cpu})
        except OSError as exc:
            self._errors.append(f"cannot pin a worker to CPU {cpu}: {exc.strerror}")
        self.native_ids[index] = tid
        try:
            self._ready.wait()
        except threading.BrokenBarrierError:
            return
        if self._errors:
            return
        while (job := self._jobs.get()) is not None:
            job.cpu = cpu
            try:
                job._result = job._fn()
            except BaseException as exc:  # handed to the waiter, like a future does
                job._exception = exc
            job._finished.set()
            self._completed.append(job)
            sched = self._sched
            if sched is not None:
                sched.notify()
