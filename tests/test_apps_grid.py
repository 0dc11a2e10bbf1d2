"""The grid mini-apps under the harness (stencil, CG), and that their checks can fail."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from fixtures import APPS, job_env
from mckmpi.trace.reader import open_run
from test_apps import LAYOUTS, run_app

#: One grid configuration per layout, so both dimensions and both scaling modes are covered.
STENCIL = {
    "1": ["--ndim", "3", "--local", "12", "--iterations", "30"],
    "2": ["--local", "48x40", "--iterations", "50"],
    "4-oversubscribed": ["--ndim", "3", "--scaling", "strong", "--size", "24x16x16", "--iterations", "30"],
    "vnodes2": ["--scaling", "strong", "--size", "64x32", "--iterations", "40"],
    "lwk-1": ["--local", "32x32", "--iterations", "30"],
    "lwk-4-oversubscribed": ["--scaling", "strong", "--size", "32x32", "--iterations", "30"],
    "lwk-vnodes2": ["--ndim", "3", "--local", "10", "--iterations", "20"],
}
CG = {
    "1": ["--local", "12"],
    "2": ["--scaling", "strong", "--size", "24"],
    "4-oversubscribed": ["--local", "8"],
    "vnodes2": ["--scaling", "strong", "--size", "16x24x20"],
    "lwk-1": ["--local", "10"],
    "lwk-4-oversubscribed": ["--scaling", "strong", "--size", "16"],
    "lwk-vnodes2": ["--local", "10"],
}


def _phases(run, size: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    it, comp, comm = (run.read(f"app/{k}") for k in ("iter_ns", "compute_ns", "comm_ns"))
    for a in (it, comp, comm):
        assert a.shape == (size, n) and a.dtype == np.int64
    assert run.units("app/iter_ns") == "ns"
    assert (comp > 0).all() and (comm >= 0).all() and (it >= comp + comm).all()
    return it, comp, comm


@pytest.mark.parametrize("layout", LAYOUTS)
def test_stencil_verifies(layout, tmp_path):
    args = STENCIL[layout]
    _, out = run_app(tmp_path, layout, "stencil", *args)
    with open_run(out) as run:
        size = run.world_size
        attrs = run.group_attrs("app")
        n = int(args[args.index("--iterations") + 1])
        it, comp, comm = _phases(run, size, n)
        error = run.scalars("app/error")
    assert attrs["name"] == "stencil" and attrs["verified"] and attrs["iterations"] == n
    assert attrs["error"] < 1e-9 and (error == attrs["error"]).all()
    assert (it == comp + comm).all()
    assert math.prod(map(int, attrs["process_grid"].split("x"))) == size
    if "--size" in args:
        assert attrs["scaling"] == "strong"
        want = args[args.index("--size") + 1]
        assert attrs["global_size"] == want
    else:
        local = [int(x) for x in args[args.index("--local") + 1].split("x")]
        dims = [int(x) for x in attrs["process_grid"].split("x")]
        local = local * len(dims) if len(local) == 1 else local
        assert attrs["global_size"] == "x".join(str(a * b) for a, b in zip(local, dims, strict=True))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cg_converges_to_the_manufactured_solution(layout, tmp_path):
    _, out = run_app(tmp_path, layout, "cg", *CG[layout])
    with open_run(out) as run:
        size = run.world_size
        attrs = run.group_attrs("app")
        n = attrs["iterations"]
        _phases(run, size, n)
        halo = run.read("app/halo_ns")
        residual, error = run.scalars("app/residual"), run.scalars("app/error")
    assert attrs["name"] == "cg" and attrs["verified"] and attrs["converged"]
    assert 5 < n < 2000 and halo.shape == (size, n)
    assert (residual <= 10 * attrs["tolerance"]).all() and (error < 1e-5).all()


BROKEN_HALO = """\
import runpy, sys
from mckmpi import appkit
appkit.Halo.finish = lambda self, i: self._mpi.Request.Waitall(self._requests)  # never unpacks
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("app,args,message", [
    ("stencil", ["--local", "16", "--iterations", "10"], "stencil result is wrong"),
    ("cg", ["--local", "8", "--max-iter", "200"], "cg did not solve the system"),
])
def test_a_halo_that_is_never_unpacked_fails_verification(app, args, message, tmp_path):
    driver = tmp_path / "broken.py"
    driver.write_text(BROKEN_HALO)
    cmd = ["mpiexec", "-n", "2", sys.executable, str(driver), str(APPS / f"{app}.py"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=job_env())
    assert proc.returncode != 0
    assert message in proc.stderr
