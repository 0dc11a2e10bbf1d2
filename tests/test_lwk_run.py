"""`mckmpi run --mode lwk` end to end: arena, scheduler, GC control and pinning in a real job."""

import os
import shutil
import subprocess

import h5py
import pytest

from fixtures import APPS, mckmpi, mpirun
from mckmpi.jobs.launchers import Job
from mckmpi.utility.units import format_cpulist

PROBE = r'''
import gc, os, threading, weakref
import numpy as np
import mckmpi, mckmpi.lwk
from mpi4py import MPI

ctx = mckmpi.context()
assert ctx.mode == "lwk" and ctx.scheduler is not None
a = ctx.mem.zeros(1000)
assert ctx.mem.contains(a.ctypes.data, a.nbytes)

class Node:
    pass
n = Node(); n.self = n
ref = weakref.ref(n)
del n
junk = [[i] for i in range(100000)]  # would trigger automatic collections if the GC ran
assert ref() is not None, "a cycle was collected before the safepoint"
mckmpi.lwk.safepoint()
assert ref() is None, "the safepoint did not collect the cycle"

order = []
def worker(tag):
    for i in range(3):
        order.append((tag, i))
        ctx.scheduler.yield_()
tasks = [ctx.scheduler.spawn(worker, t) for t in "ab"]
for t in tasks:
    ctx.scheduler.join(t)
assert order == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)], order

status = open("/proc/thread-self/status").read()
mine = [l.split()[-1] for l in status.splitlines() if l.startswith("Cpus_allowed_list")][0]
others = set()
for tid in os.listdir("/proc/self/task"):
    if int(tid) != threading.get_native_id():
        st = open(f"/proc/self/task/{tid}/status").read()
        others.add([l.split()[-1] for l in st.splitlines() if l.startswith("Cpus_allowed_list")][0])
print(f"PIN rank={MPI.COMM_WORLD.Get_rank()} main={mine} others={sorted(others)}", flush=True)
'''


@pytest.fixture
def probe(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text(PROBE)
    return path


def _plan(ranks):
    import json

    proc = mckmpi("partition", "show", "--json", "--mode", "lwk", "--ranks", str(ranks), "--oversubscribe")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)[0]


def test_lwk_two_ranks_record_memory_and_scheduler(tmp_path, probe):
    out = tmp_path / "lwk.h5"
    proc = mpirun(2, "run", "--mode", "lwk", "--oversubscribe", "--mem", "64M", "--rank-policy",
                  "fifo", "--out", str(out), "--", str(probe))
    assert proc.returncode == 0, proc.stderr
    plan = _plan(2)
    for line in (l for l in proc.stdout.splitlines() if l.startswith("PIN")):
        rank = int(line.split()[1].split("=")[1])
        assert f"main={format_cpulist(plan['ranks'][rank]['cpus'])}" in line
        # MPI's helper threads run on the Linux cores, like McKernel's service side.
        assert f"others=['{format_cpulist(plan['linux_cpus'])}']" in line or "others=[]" in line
    with h5py.File(out) as f:
        assert list(f["memory/size"][()]) == [64 * 1024**2] * 2
        assert (f["memory/allocations"][()] >= 1).all()
        assert (f["scheduler/tasks_spawned"][()] >= 3).all()
        assert (f["scheduler/safepoints"][()] == 1).all()
        assert not f["scheduler/gc_enabled"][()].any()
        # Oversubscribed ranks share a core: FIFO would starve one of them, so it is refused.
        assert all(b"oversubscribe" in r for r in f["scheduler/policy_reason"][()])
        assert f.attrs["mode"] == "lwk"


def test_lwk_single_rank_gets_fifo_when_it_owns_its_core(tmp_path):
    out = tmp_path / "one.h5"
    proc = mckmpi("run", "--mode", "lwk", "--mem", "32M", "--rank-policy", "fifo", "--out",
                  str(out), "--", str(APPS / "fwq.py"), "--samples", "20", "--quantum-us", "100")
    assert proc.returncode == 0, proc.stderr
    with h5py.File(out) as f:
        assert f["scheduler/policy"][0] == b"SCHED_FIFO", f["scheduler/policy_reason"][0]
        assert b"throttling" in f["scheduler/policy_reason"][0]
        assert f["memory/size"][0] == 32 * 1024**2
        assert f["ranks"]["mem"][0] == 32 * 1024**2


@pytest.mark.parametrize("args,match", [
    (["--mem", "100T"], "exceeds"),
    (["--mem", "zero"], "not a size"),
    (["--hugepages", "require", "--mem", "64M"], "huge"),
])
def test_lwk_bad_input_is_one_line(args, match, tmp_path):
    proc = mckmpi("run", "--mode", "lwk", *args, "--out", str(tmp_path), "--",
                  str(APPS / "fwq.py"), "--samples", "5", timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.startswith("mckmpi: error:")]
    assert len(lines) == 1 and match in lines[0].lower(), proc.stderr
    assert not list(tmp_path.iterdir())  # refused before the run file was reserved


@pytest.mark.skipif(not shutil.which("prlimit") or not shutil.which("setpriv"),
                    reason="needs util-linux's prlimit and setpriv")
@pytest.mark.parametrize("ranks", [1, 2])
def test_a_refusal_found_at_boot_leaves_no_run_file(tmp_path, ranks):
    """mlock failing is only found when the arena locks its memory, after the run file was
    reserved: the reserved file and its spools go, nothing having been recorded."""
    launch = Job(("-m", "mckmpi", "run", "--mode", "lwk", "--oversubscribe", "--memlock",
                  "require", "--mem", "16M", "--out", str(tmp_path), "--", str(APPS / "fwq.py"),
                  "--samples", "5"), ranks, options=None,
                 oversubscribe=True).render("mpiexec" if ranks > 1 else "local")
    # no CAP_IPC_LOCK (root's way around the limit) and a hard RLIMIT_MEMLOCK below 16M
    drop = ["setpriv", "--bounding-set", "-ipc_lock", "--inh-caps", "-ipc_lock"] \
        if os.geteuid() == 0 else []
    proc = subprocess.run([*drop, "prlimit", "--memlock=65536:65536", *launch.argv],
                          capture_output=True, text=True, timeout=90, env=launch.env)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "mckmpi: error: arena locking required but mlock failed" in proc.stderr, proc.stderr
    assert not list(tmp_path.iterdir())


def test_rank_runs_inside_a_reserved_cpuset(tmp_path):
    name = f"mckmpi-test-{tmp_path.name[-12:]}".replace("_", "-")
    reserved = mckmpi("partition", "reserve", "--name", name, "--linux-cores", "1")
    assert reserved.returncode == 0, reserved.stderr
    try:
        app = tmp_path / "where.py"
        app.write_text("print('CG', [l for l in open('/proc/self/cgroup') if ':cpuset:' in l or l.startswith('0::')])\n")
        proc = mckmpi("run", "--mode", "lwk", "--cpuset", name, "--mem", "16M", "--out", str(tmp_path), "--", str(app))
        assert proc.returncode == 0, proc.stderr
        assert f"/{name}/lwk" in proc.stdout
    finally:
        released = mckmpi("partition", "release", "--name", name)
        assert released.returncode == 0, released.stdout + released.stderr
    assert mckmpi("partition", "status", "--name", name).stdout.strip() == "no cpuset reservations"


def test_cpuset_needs_lwk_mode(tmp_path):
    proc = mckmpi("run", "--cpuset", "anything", "--", str(APPS / "fwq.py"))
    assert proc.returncode == 2 and "--mode lwk" in proc.stderr
