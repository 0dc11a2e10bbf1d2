"""Soak: a full node's ranks on one proxy each, for long (`make soak`; not in the default run).

64 ranks in lwk mode on two virtual nodes (one proxy serving 32 ranks each, everything
oversubscribed on this host), each doing SOAK_OPS offloaded operations of mixed kinds --
open, stat, pwrite, pread, fsync, close, unlink, 64 B to 1 MiB, from the arena and from
ordinary memory -- and verifying every byte it reads back. Passing means: no error, the
run file holds exactly the calls each rank made, and nothing is left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from fixtures import job_env, mpirun

from mckmpi.offload.syscalls import FD_BASE
from mckmpi.trace.reader import open_run

pytestmark = [pytest.mark.offload, pytest.mark.soak]

RANKS = 64
VNODES = 2
SOAK_OPS = int(os.environ.get("MCKMPI_SOAK_OPS", "10000"))

APP = r"""
import gc, json, os, sys, time
import numpy as np
import mckmpi
from mpi4py import MPI

rank = MPI.COMM_WORLD.Get_rank()
ops_wanted = int(sys.argv[2])
here = os.path.join(sys.argv[1], f"r{rank}")
os.mkdir(here)
rng = np.random.default_rng(rank)
MiB = 1 << 20
pattern = rng.integers(0, 256, 2 * MiB, dtype=np.uint8)
plain = pattern.tobytes()
arena = mckmpi.context().mem.empty(2 * MiB, dtype=np.uint8)
arena[:] = pattern
back = mckmpi.context().mem.empty(MiB, dtype=np.uint8)
# log-uniform sizes from 64 B to 1 MiB, and start offsets into the pattern
sizes = np.exp(rng.uniform(np.log(64), np.log(MiB), ops_wanted)).astype(np.int64)
starts = rng.integers(0, MiB, ops_wanted)
counts = {}
bad = 0

def count(name):
    counts[name] = counts.get(name, 0) + 1

gc.disable()
MPI.COMM_WORLD.Barrier()
t0 = time.monotonic_ns()
done = files = 0
while done < ops_wanted:
    # one file's life: open, writes, stat, reads verified, fsync, close, unlink (>= 7 ops)
    path = os.path.join(here, f"f{files}")
    files += 1
    fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o600); count("openat")
    done += 1
    extents = []
    offset = 0
    for k in range(int(rng.integers(1, 4))):
        i = done % ops_wanted
        n, s = int(sizes[i]), int(starts[i])
        src = arena[s:s + n] if k % 2 == 0 else plain[s:s + n]
        if os.pwrite(fd, src, offset) != n:
            bad += 1
        count("pwrite64")
        extents.append((offset, s, n))
        offset += n
        done += 1
    if os.stat(path).st_size != offset:
        bad += 1
    count("stat")
    done += 1
    for k, (off, s, n) in enumerate(extents):
        if k % 2 == 0:  # into the arena (zero copy), else into ordinary memory
            view = back[:n]
            if os.preadv(fd, [view], off) != n or not np.array_equal(view, pattern[s:s + n]):
                bad += 1
            count("preadv")
        else:
            if os.pread(fd, n, off) != plain[s:s + n]:
                bad += 1
            count("pread64")
        done += 1
    os.fsync(fd); count("fsync")
    os.close(fd); count("close")
    os.unlink(path); count("unlink")
    done += 3
t1 = time.monotonic_ns()
os.rmdir(here)
# one write per report (print writes the newline apart when stdout is unbuffered, and the
# launcher may then interleave two ranks' lines)
os.write(1, ("SOAK " + json.dumps({"rank": rank, "t0": t0, "t1": t1, "ops": done,
                                   "files": files, "bad": bad, "counts": counts})
             + "\n").encode())
"""

#: the system calls (as the run file names them) the C library may use for each operation
SYSCALLS = {"openat": (b"openat", b"open"), "pwrite64": (b"pwrite64",),
            "preadv": (b"preadv", b"preadv2"), "pread64": (b"pread64",), "fsync": (b"fsync",),
            "close": (b"close",), "unlink": (b"unlink", b"unlinkat"),
            "stat": (b"newfstatat", b"statx", b"stat")}


@pytest.mark.timeout(3600)
def test_64_ranks_on_two_proxies_soak(tmp_path: Path):
    app = tmp_path / "soak.py"
    app.write_text(APP)
    # data on tmpfs (fsync is then the call, not a disk's latency), offloaded explicitly:
    # /dev is native by default because MPI's shared memory lives there
    data = Path(tempfile.mkdtemp(prefix="mckmpi-soak-", dir="/dev/shm"))
    xdg = Path(tempfile.mkdtemp(prefix="mks"))  # short: the proxy's socket path must fit
    try:
        _soak(tmp_path, app, data, xdg)
    finally:
        shutil.rmtree(xdg, ignore_errors=True)
        shutil.rmtree(data, ignore_errors=True)


def _soak(tmp_path: Path, app: Path, data: Path, xdg: Path) -> None:
    out = tmp_path / "soak.h5"
    env = job_env(XDG_RUNTIME_DIR=str(xdg))
    start = time.monotonic()
    proc = mpirun(RANKS, "run", "--mode", "lwk", "--vnodes", str(VNODES), "--oversubscribe",
                  "--offload-include", str(data), "--mem", "16M",
                  "--out", str(out), "--", str(app), str(data), str(SOAK_OPS),
                  oversubscribe=True, env=env, timeout=3000)
    wall = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = sorted((json.loads(line[5:]) for line in proc.stdout.splitlines()
                      if line.startswith("SOAK ")), key=lambda r: r["rank"])
    assert [r["rank"] for r in reports] == list(range(RANKS)), proc.stdout[-2000:]
    assert all(r["bad"] == 0 and r["ops"] >= SOAK_OPS for r in reports)
    with open_run(out) as run:
        calls = run.read("offload/calls")
    # The app's calls: executed by the proxy, but closes of its offloaded descriptors, which
    # the kernel serves. Other native calls of the rank's process meanwhile (the MPI
    # library's, a lazy import) are not the app's operations.
    apps = calls[((calls["how"] & 1) != 0)
                 | ((calls["call"] == b"close") & (calls["fd"] >= FD_BASE))]
    for r in reports:  # exactly the calls the rank made
        mine = apps[(apps["rank"] == r["rank"]) & (apps["trap_ns"] >= r["t0"])
                    & (apps["trap_ns"] <= r["t1"])]
        names, counted = np.unique(mine["call"], return_counts=True)
        got = dict(zip(names.tolist(), counted.tolist()))
        by_op = {op: sum(got.pop(n, 0) for n in names) for op, names in SYSCALLS.items()}
        assert got == {} and by_op == r["counts"], (r["rank"], got, by_op, r["counts"])
        assert (mine["errno"] == 0).all() and (mine["result"] >= 0).all()
    # nothing left: no data file, no proxy socket or run directory, no proxy process
    assert list(data.iterdir()) == []
    assert [p for p in xdg.rglob("*") if not p.is_dir()] == []
    proxies = [p for p in Path("/proc").iterdir() if p.name.isdigit()
               and str(xdg).encode() in _cmdline(p)]
    assert proxies == []
    total = sum(r["ops"] for r in reports)
    print(f"soak: {RANKS} ranks x {SOAK_OPS} ops ({total} offloaded operations) in "
          f"{wall:.1f} s wall")
    if os.environ.get("MCKMPI_SOAK_RECORD"):
        Path(os.environ["MCKMPI_SOAK_RECORD"]).write_text(json.dumps({
            "soak": "64 ranks, lwk mode, --vnodes 2 --oversubscribe (one proxy per virtual "
                    "node serving 32 ranks)",
            "ranks": RANKS, "ops_per_rank": SOAK_OPS, "operations": total,
            "bytes_per_op": "64 B to 1 MiB, log-uniform", "errors": 0,
            "wall_s": round(wall, 1), "loadavg_at_end": round(os.getloadavg()[0], 2),
        }, indent=2) + "\n")


def _cmdline(p: Path) -> bytes:
    try:
        return (p / "cmdline").read_bytes()
    except OSError:
        return b""
