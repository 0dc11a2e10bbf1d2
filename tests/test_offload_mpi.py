"""The offload inside real MPI jobs: the proxy started after MPI init by the node-local rank
0, TSYNC over Open MPI's helper threads, and a dead proxy aborting the whole job."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixtures import job_env

pytestmark = pytest.mark.offload

RANK = """
import json, os, signal, sys, time
from pathlib import Path
from mpi4py import MPI
import numpy as np
from mckmpi.offload import client, spawn, syscalls
from mckmpi.offload.policy import Policy

world = MPI.COMM_WORLD
node = world.Split_type(MPI.COMM_TYPE_SHARED)
out, mode = Path(sys.argv[1]), sys.argv[2]
if node.Get_rank() == 0:
    handle = spawn.start_node_proxy(out / "run", [], expected=node.Get_size())
    (out / "proxy.pid").write_text(str(handle.pid))
node.Barrier()
s = client.attach(spawn.socket_path(out / "run"), rank=world.Get_rank(), arena_memfd=None,
                  policy=Policy(),
                  on_proxy_death=lambda m: (print(m, file=sys.stderr, flush=True), world.Abort(70)))
node.Barrier()
if mode == "kill" and world.Get_rank() == 0:
    (out / "killed_at").write_text(repr(time.time()))
    os.kill(int((out / "proxy.pid").read_text()), signal.SIGKILL)
if mode == "kill":
    while True:  # computing, or blocked in MPI: the watcher must end the job
        world.Barrier()
        time.sleep(0.01)
a = np.full(100_000, float(world.Get_rank()))
np.save(out / f"r{world.Get_rank()}.npy", a)
total = world.allreduce(float(np.load(out / f"r{world.Get_rank()}.npy").sum()))
world.Barrier()
rec = s.detach()
# one file per rank: two ranks' lines on one stdout may interleave
(out / f"rank{world.Get_rank()}.json").write_text(json.dumps(
    {"rank": world.Get_rank(), "total": total, "threads": len(os.listdir("/proc/self/task")),
     "calls": sorted({syscalls.name_of(c) for c in rec["call"]}),
     "bytes": int(rec["bytes"].sum())}))
"""


def _job(tmp_path: Path, mode: str, timeout: float) -> subprocess.CompletedProcess:
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    cmd = ["mpiexec", "-n", "2", "--oversubscribe", "--bind-to", "none", sys.executable,
           str(script), str(tmp_path), mode]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=job_env(),
                          check=False)


def test_ranks_of_an_mpi_job_offload_through_their_node_proxy(tmp_path: Path):
    r = _job(tmp_path, "io", 90)
    assert r.returncode == 0, r.stderr
    rows = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [row["rank"] for row in rows] == [0, 1]
    for row in rows:
        assert row["total"] == 100_000.0
        assert {"openat", "write", "read", "fcntl"} <= set(row["calls"])
        assert row["bytes"] >= 2 * 800_000
        assert row["threads"] > 1  # Open MPI's helper threads existed and were synced
    assert (tmp_path / "r1.npy").exists() and not (tmp_path / "run").exists()


def test_a_dead_proxy_aborts_the_mpi_job_within_5_s(tmp_path: Path):
    r = _job(tmp_path, "kill", 60)
    ended = time.time()
    assert r.returncode != 0
    assert "offload proxy" in r.stderr and "died" in r.stderr, r.stderr
    elapsed = ended - float((tmp_path / "killed_at").read_text())
    assert elapsed < 5, elapsed
