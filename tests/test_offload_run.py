"""`mckmpi run` with the offload: the node proxy serves the ranks' file I/O and the calls
land in the run file."""

import subprocess
import sys

import h5py
import numpy as np
import pytest
from fixtures import job_env, mpirun

from mckmpi.trace.reader import open_run

pytestmark = pytest.mark.offload

APP = """
import numpy as np, mckmpi
from mpi4py import MPI
r = MPI.COMM_WORLD.Get_rank()
a = mckmpi.context().mem.zeros(4096) + r
np.save(f"{out}/data-{r}.npy", a)
assert (np.load(f"{out}/data-{r}.npy") == r).all()
import h5py  # HDF5's C library does its own open/pwrite/pread
with h5py.File(f"{out}/data-{r}.h5", "w") as f:
    f["a"] = a
with h5py.File(f"{out}/data-{r}.h5", "r") as f:
    assert (f["a"][()] == r).all()
print("OFFLOAD", r, mckmpi.context().offload is not None)
"""


@pytest.mark.parametrize("mode,args,offloaded", [
    ("lwk", ["--mem", "32M", "--oversubscribe"], True),
    ("lwk", ["--mem", "32M", "--oversubscribe", "--offload", "none"], False),
    ("linux", [], False),
    ("linux", ["--offload", "io"], True),
])
def test_offloaded_io_is_traced(tmp_path, mode, args, offloaded):
    app = tmp_path / "io.py"
    app.write_text(APP.replace("{out}", str(tmp_path)))
    out = tmp_path / "run.h5"
    proc = mpirun(2, "run", "--mode", mode, *args, "--out", str(out), "--", str(app), timeout=90)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("True") == (2 if offloaded else 0)
    for r in range(2):
        assert (np.load(tmp_path / f"data-{r}.npy") == r).all()
        with h5py.File(tmp_path / f"data-{r}.h5") as f:
            assert (f["a"][()] == r).all()
    with open_run(out) as run:
        assert ("offload/calls" in run) == offloaded
        if offloaded:
            calls = run.read("offload/calls")
            names = set(calls["call"])
            assert {b"openat", b"write", b"pwrite64", b"pread64"} <= names  # numpy, HDF5
            assert set(calls["rank"]) == {0, 1}
            assert (calls["done_ns"] >= calls["trap_ns"]).all()
            written = calls[(calls["call"] == b"write") & (calls["errno"] == 0)]["result"].sum()
            assert written >= 2 * 4096 * 8


def test_a_c_binary_in_an_lwk_rank_is_offloaded(tmp_path):
    """/bin/cp runs as the rank's child under its filter: its copy goes through the proxy."""
    src = tmp_path / "src.bin"
    src.write_bytes(np.random.default_rng(1).bytes(3 << 20))
    out = tmp_path / "run.h5"
    proc = mpirun(1, "run", "--mode", "lwk", "--mem", "32M", "--out", str(out), "--",
                  "/bin/cp", str(src), str(tmp_path / "copy.bin"), timeout=90)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "copy.bin").read_bytes() == src.read_bytes()
    with open_run(out) as run:
        calls = run.read("offload/calls")
    moved = calls[np.isin(calls["call"], [b"copy_file_range", b"read", b"write", b"sendfile"])
                  & (calls["errno"] == 0)]["bytes"].sum()
    assert moved >= 3 << 20
    assert b"openat" in set(calls["call"])


def test_ranks_attach_to_a_proxy_started_by_hand(tmp_path):
    """One `mckmpi proxy` per node started apart from the job (as an srun task would be);
    `--offload-proxy` makes the ranks use it, and it leaves when they are done."""
    sock = tmp_path / "proxy" / "proxy.sock"
    log = tmp_path / "proxy.log"
    with open(log, "w") as err:
        proxy = subprocess.Popen([sys.executable, "-m", "mckmpi", "proxy", "--socket", str(sock),
                                  "--expect", "2"], env=job_env(), stderr=err)
    try:
        app = tmp_path / "io.py"
        app.write_text(APP.replace("{out}", str(tmp_path)))
        out = tmp_path / "run.h5"
        proc = mpirun(2, "run", "--mode", "lwk", "--mem", "32M", "--oversubscribe",
                      "--offload-proxy", str(sock), "--out", str(out), "--", str(app), timeout=90)
        assert proc.returncode == 0, proc.stderr
        assert proxy.wait(10) == 0, log.read_text()
    finally:
        proxy.kill()
        proxy.wait()
    assert not sock.parent.exists()  # it created the directory, so it removed it
    with open_run(out) as run:
        assert set(run.read("offload/calls", "rank")) == {0, 1}
