"""User errors end with one clear line and exit 2: no traceback, no hang."""

import json
from pathlib import Path

import pytest

from fixtures import APPS, mckmpi, mpirun


def _one_clear_line(proc):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mckmpi: error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


@pytest.mark.parametrize("args,match", [
    (["run", "--mem", "lots", "--", str(APPS / "fwq.py")], "not a size"),
    (["partition", "show", "--mode", "lwk", "--mem", "100T"], "exceeds"),
    (["partition", "show", "--linux-cores", "0-99", "--mode", "lwk"], "not allowed on this node"),
    (["run", "--", "apps/does-not-exist.py"], "app not found"),
    (["run", "--", "no-such-binary-anywhere"], "not found on PATH"),
    (["run"], "nothing to run"),
    (["partition", "show", "--mode", "lwk", "--ranks", "64"], "--oversubscribe"),
    (["partition", "show", "--ranks", "0"], "at least 1"),
    (["partition", "show", "--vnodes", "0"], "at least 1"),
    (["report", "/nonexistent.h5"], "no such run file"),
    (["run", "--mode", "lwk", "--offload-include", "rel/path", "--", "/bin/true"], "absolute path"),
    (["run", "--mode", "lwk", "--offload-include", "/proc/self", "--", "/bin/true"], "/proc"),
    (["proxy", "--socket", "/nonexistent/dir/proxy.sock"], "does not exist"),
])
def test_user_errors(args, match):
    line = _one_clear_line(mckmpi(*args, timeout=30))
    assert match in line


def test_env_errors_name_the_variable():
    from fixtures import job_env

    line = _one_clear_line(mckmpi("partition", "show", env=job_env(MCKMPI_MODE="fast")))
    assert "MCKMPI_MODE" in line


def test_unknown_option_is_one_line_pointing_at_the_help():
    line = _one_clear_line(mckmpi("run", "--no-such-option", "--", "x.py"))
    assert "--no-such-option" in line and "mckmpi run --help" in line


def test_help_teaches():
    out = mckmpi("run", "--help").stdout
    for word in ("--mode", "--linux-cores", "--lwk-cores", "--mem", "--oversubscribe", "--vnodes",
                 "MCKMPI_MEM", "mpiexec"):
        assert word in out


def test_partition_show_json():
    proc = mckmpi("partition", "show", "--mode", "lwk", "--ranks", "3", "--oversubscribe", "--json")
    assert proc.returncode == 0, proc.stderr
    plans = json.loads(proc.stdout)
    assert len(plans) == 1 and len(plans[0]["ranks"]) == 3
    assert not set(plans[0]["linux_cpus"]) & set(plans[0]["lwk_cpus"])


def test_info():
    proc = mckmpi("info", "--json")
    assert proc.returncode == 0, proc.stderr
    facts = json.loads(proc.stdout)
    assert "Open MPI" in facts["versions"]["mpi_library"]
    assert facts["versions"]["h5py_mpi"] == "True"
    assert "user_notif" in facts["seccomp"]


def test_parallel_errors_print_once_per_node():
    proc = mpirun(2, "run", "--", "apps/missing.py", timeout=60)
    assert proc.returncode != 0
    assert proc.stderr.count("mckmpi: error: app not found") == 1


def test_report_fwq_columns_say_sample_or_excess(tmp_path):
    """The FWQ table mixed a sample (min) and excess values (percentiles, max) under
    look-alike headers: each header now says which, as results/README.md defines them."""
    import re

    import numpy as np

    from test_analysis import write_synthetic

    samples = np.array([2000, 2500, 2000, 12000, 3000], dtype=np.int64)
    path = write_synthetic(tmp_path / "run.h5", fwq=samples)
    proc = mckmpi("report", str(path))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    at = lines.index("FWQ noise") + 1
    table = dict(zip(re.split(r"\s{2,}", lines[at].strip()), lines[at + 2].split()))
    assert float(table["min sample us"]) == samples.min() / 1e3
    assert float(table["excess max us"]) == (samples.max() - samples.min()) / 1e3
    assert float(table["excess p50 us"]) == (np.sort(samples)[2] - samples.min()) / 1e3
    assert not any(h in table for h in ("min us", "p50 us", "max us"))
    assert "excess = sample - the rank's smallest sample" in lines[at + 3]
    readme = (Path(__file__).resolve().parents[1] / "results" / "README.md").read_text()
    assert "sample - the rank's smallest sample" in readme
