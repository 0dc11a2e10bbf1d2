"""A job killed while it writes its run file leaves no file that claims to be complete.

The app records a large array on every rank, so writing takes a while; the test watches the
final file being written (inside ``run.h5.partial.d``) and SIGKILLs one rank once it holds
a first MiB, i.e. in the middle of writing the data, with either writer and either rank
killed. What is left is the partial file, which says it is partial and still reads.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fixtures import job_env, mckmpi
from mckmpi.trace.reader import RunFileError, open_run
from mckmpi.trace.writer import FINAL_NAME

SAMPLES = 24 << 20  # 192 MiB per rank: the write lasts long enough to be interrupted

BIG_APP = textwrap.dedent(f"""
    import os, sys
    import numpy as np
    from mpi4py import MPI
    import mckmpi

    rank = MPI.COMM_WORLD.Get_rank()
    data = np.arange({SAMPLES}, dtype=np.int64) * (rank + 1)
    mckmpi.context().tracer.array("noise", "fwq_ns", data, units="ns")
    with open(os.path.join(sys.argv[1], f"pid-{{rank}}"), "w") as fh:
        fh.write(str(os.getpid()))
""")


def _wait_for(path: Path, proc: subprocess.Popen, size: int, timeout: float) -> bool:
    """Whether `path` reached `size` bytes (data is being written) while the job runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if path.stat().st_size >= size:
                return True
        except FileNotFoundError:
            pass
        time.sleep(0.001)
    return False


@pytest.mark.parametrize(
    "writer,victim", [("parallel", 1), ("parallel", 0), ("gather", 0), ("gather", 1)]
)
def test_kill_a_rank_while_writing(tmp_path, writer, victim):
    app = tmp_path / "big.py"
    app.write_text(BIG_APP)
    out = tmp_path / "run.h5"
    partial = tmp_path / "run.h5.partial"
    final = tmp_path / "run.h5.partial.d" / FINAL_NAME
    cmd = [
        "mpiexec",
        "-n",
        "2",
        "--bind-to",
        "none",
        sys.executable,
        "-m",
        "mckmpi",
        "run",
        "--trace-writer",
        writer,
        "--out",
        str(out),
        "--",
        str(app),
        str(tmp_path),
    ]
    proc = subprocess.Popen(
        cmd,
        env=job_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert _wait_for(
            final, proc, size=1 << 20, timeout=60
        ), "the job never started writing the data of its run file"
        pid = int((tmp_path / f"pid-{victim}").read_text())
        os.kill(pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    assert (
        proc.returncode != 0
    ), f"the job finished before the kill: make its data larger\n{err[-500:]!r}"
    assert not out.exists(), "a killed job left a run file under the final name"
    with pytest.raises(RunFileError, match="incomplete run file"):
        open_run(partial)
    report = mckmpi("report", str(partial), timeout=120)
    assert report.returncode == 0 and "Traceback" not in report.stderr, report.stderr
    assert "partial run file" in report.stderr
