"""The runner's use of the offload: start the node proxy, attach every rank, collect records.

`start` (right after MPI init: the proxy is spawned before the rank changes its cgroup or
scheduling), `OffloadRun.attach` (after the LWK boot, so the filter covers MPI's threads
and the arena can be shared with the proxy) and `OffloadRun.finish` (records into the
trace). Kept apart from the runner so the runner stays a list of stages.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mckmpi.config import Settings
from mckmpi.errors import error_line
from mckmpi.node.partition import NodePlan
from mckmpi.node.placement import Placement
from mckmpi.offload import client, seccomp, spawn, syscalls
from mckmpi.offload.client import EXIT_PROXY_DIED, OffloadSession
from mckmpi.offload.errors import OffloadError
from mckmpi.offload.policy import Policy
from mckmpi.trace.tracer import Tracer

#: How long a rank other than the node's rank 0 waits before it reports a lost proxy (the
#: node's rank 0 reports the same loss and aborts the job meanwhile, also on a busy node).
ABORT_GRACE_S = 5.0

#: How long a rank waits for a proxy started by hand (--offload-proxy) to listen.
HAND_STARTED_WAIT_S = 30.0

#: The run file's offload/calls table (the writer adds the rank column).
CALLS_DTYPE = np.dtype([("call", "S16"), ("fd", "i4"), ("bytes", "i8"), ("result", "i8"),
                        ("errno", "i4"), ("trap_ns", "i8"), ("done_ns", "i8"), ("how", "u1")])


def policy_of(settings: Settings) -> Policy:
    """The offload policy `settings` ask for; mode none in linux mode unless asked."""
    mode = settings.offload if settings.offload != "auto" else ("io" if settings.mode == "lwk" else "none")

    def prefixes(text: str) -> tuple[str, ...]:
        return tuple(p.strip() for p in text.split(",") if p.strip())

    return Policy(mode, prefixes(settings.offload_include), prefixes(settings.offload_exclude))


def run_dir(job_key: str, placement: Placement) -> Path:
    """This node's proxy directory (see `spawn.runtime_dir`), swept of what killed proxies
    of earlier jobs left; any warning is printed once (the caller is node-local rank 0)."""
    directory, warning = spawn.runtime_dir(job_key, placement.node)
    if warning is None:
        spawn.sweep_stale(directory.parent)
    else:
        print(f"mckmpi: warning: {warning}", file=sys.stderr, flush=True)
    return directory


@dataclass
class OffloadRun:
    """One rank's offload across the run: the node proxy (started first), then the rank's
    registration, then its records."""
    policy: Policy
    socket: Path
    handle: Any = None  # the proxy handle on the node's local rank 0, else None
    session: OffloadSession | None = None
    _traced: int = -1  # calls in the last table traced

    def attach(self, placement: Placement, node_comm: Any, world: Any, arena: Any,
               before_abort: Callable[[str], None] | None = None) -> OffloadSession:
        """Register with the node proxy and install the filter (after the LWK boot, so the
        arena can be shared with the proxy). Losing the proxy aborts the job, after
        `before_abort(message)` (the run file records the ending)."""

        def proxy_died(message: str) -> None:
            if before_abort is not None:
                before_abort(message)  # the run file records the ending first
            # Every rank of the node sees the proxy go: its local rank 0 speaks for them,
            # the others speak only if the job is still up after the grace period.
            if placement.local_rank != 0:
                time.sleep(ABORT_GRACE_S)
            os.write(2, f"{error_line(message)}\n".encode())
            world.Abort(EXIT_PROXY_DIED)

        self.session = client.attach(self.socket, rank=placement.rank,
                                     arena_memfd=None if arena is None else arena.memfd,
                                     arena_address=None if arena is None else arena.address,
                                     policy=self.policy, on_proxy_death=proxy_died)
        node_comm.Barrier()  # every rank of the node registered before any can finish
        return self.session

    def finish(self, tracer: Tracer) -> None:
        """Detach (the proxy passes calls through from now on) and trace every call."""
        assert self.session is not None
        self._trace(tracer, self.session.detach())

    def snapshot(self, tracer: Tracer) -> None:
        """Trace the calls so far, staying attached (called by the run file's streamer
        before each flush, when the count changed)."""
        if self.session is not None and not self.session.detached:
            records = self.session.records()
            if len(records) != self._traced:
                self._trace(tracer, records)

    def _trace(self, tracer: Tracer, records: np.ndarray) -> None:
        assert self.session is not None
        self._traced = len(records)
        rows = np.zeros(len(records), dtype=CALLS_DTYPE)
        rows["call"] = [syscalls.name_of(int(n)).encode()[:16] for n in records["call"]]
        for name in ("fd", "bytes", "result", "errno", "trap_ns", "done_ns", "how"):
            rows[name] = records[name]
        tracer.table("offload", "calls", rows, units={"bytes": "B", "trap_ns": "ns", "done_ns": "ns"})
        tracer.scalar("offload", "zero_copy", bool(self.session.zero_copy))


def start(policy: Policy, proxy_socket: str | None, placement: Placement, plan: NodePlan,
          node_comm: Any, world: Any, tag: str = "") -> OffloadRun | None:
    """Start the node's proxy on its Linux cores (node-local rank 0); None when off.

    Called right after MPI init, before the rank enters an LWK cpuset or changes its
    scheduling: the proxy is a Linux process and must not inherit either, nor the filter.
    `policy` is `policy_of(settings)`, found before MPI init; `proxy_socket` names a proxy
    started by hand (--offload-proxy), else the node's local rank 0 starts one; `tag`
    (--tag) leads the name of its directory.
    """
    if not policy.active:
        return None
    seccomp.require()
    if proxy_socket:  # started by hand: it may come up a little after the ranks
        socket = Path(proxy_socket)
        spawn.wait_for_socket(socket, HAND_STARTED_WAIT_S)
        return OffloadRun(policy, socket)
    key = world.bcast(job_key(tag) if placement.rank == 0 else None, root=0)
    handle, failure, directory = None, None, None
    if placement.local_rank == 0:
        try:
            directory = run_dir(key, placement)
            handle = spawn.start_node_proxy(directory, list(plan.linux_cpus),
                                            expected=placement.local_size)
        except OffloadError as exc:
            failure = str(exc)
    # Only the node's rank 0 touches the directory; the others learn where it is, or why
    # there is none (every rank raises, so none is left waiting).
    directory, failure = node_comm.bcast((directory, failure), root=0)
    if failure is not None:
        raise OffloadError(failure)
    return OffloadRun(policy, spawn.socket_path(directory), handle)


def job_key(tag: str = "") -> str:
    """A name for this job, unique on the node (two jobs of one Slurm step included): the
    user's --tag, the Slurm job and step, rank 0's pid and a clock reading."""
    job = os.environ.get("SLURM_JOB_ID")
    slurm = f"job{job}.{os.environ.get('SLURM_STEP_ID', '0')}-" if job else ""
    return f"{tag + '-' if tag else ''}{slurm}{os.getpid()}-{time.monotonic_ns() % 36**8:x}"
