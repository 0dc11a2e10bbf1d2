"""`mckmpi run` end to end under mpiexec: run files, vnodes, failures that end the job."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py

from fixtures import APPS, job_env, mckmpi, mpirun
from mckmpi import app as app_module
from mckmpi import external
from mckmpi.jobs.launchers import Job
from mckmpi.trace.reader import open_run
from mckmpi.utility.units import format_cpulist

FWQ = str(APPS / "fwq.py")


def _partition_show(*args):
    proc = mckmpi("partition", "show", "--json", *args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _ranks(path):
    with open_run(path) as run:
        return run.ranks, run.attrs, run["noise/fwq_ns"][()]


def test_two_ranks_run_file_matches_partition_show(tmp_path):
    out = tmp_path / "r.h5"
    proc = mpirun(2, "run", "--out", str(out), "--", FWQ, "--samples", "30", "--quantum-us", "100")
    assert proc.returncode == 0, proc.stderr
    ranks, attrs, samples = _ranks(out)
    assert attrs["complete"] and attrs["world_size"] == 2 and attrs["launcher"] == "openmpi"
    assert samples.shape == (2, 30) and (samples > 0).all()
    plan = _partition_show("--ranks", "2")[0]
    for r in ranks:
        want = plan["ranks"][r["local_rank"]]
        assert r["cpus"].decode() == format_cpulist(want["cpus"])
    assert not (tmp_path / "r.h5.partial").exists()


def test_vnodes_run_file_matches_partition_show(tmp_path):
    out = tmp_path / "v.h5"
    proc = mpirun(2, "run", "--vnodes", "2", "--out", str(out), "--", FWQ, "--samples", "20",
                  "--quantum-us", "100")
    assert proc.returncode == 0, proc.stderr
    ranks, attrs, _ = _ranks(out)
    assert attrs["nnodes"] == 2 and sorted(ranks["node"]) == [0, 1]
    plans = _partition_show("--vnodes", "2", "--ranks", "2")
    for r in ranks:
        plan = plans[r["vnode"]]
        assert r["cpus"].decode() == format_cpulist(plan["ranks"][r["local_rank"]]["cpus"])
        assert r["linux_cpus"].decode() == format_cpulist(plan["linux_cpus"])


def test_four_ranks_oversubscribed(tmp_path):
    out = tmp_path / "o.h5"
    proc = mpirun(4, "run", "--oversubscribe", "--out", str(out), "--", FWQ, "--samples", "10",
                  "--quantum-us", "100", oversubscribe=True)
    assert proc.returncode == 0, proc.stderr
    ranks, attrs, samples = _ranks(out)
    assert list(ranks["rank"]) == [0, 1, 2, 3] and samples.shape == (4, 10)


def test_singleton_and_directory_output(tmp_path):
    proc = mckmpi("run", "--out", str(tmp_path), "--", FWQ, "--samples", "10", "--quantum-us", "50")
    assert proc.returncode == 0, proc.stderr
    files = list(tmp_path.glob("fwq-linux-*.h5"))
    assert len(files) == 1
    ranks, attrs, _ = _ranks(files[0])
    assert attrs["launcher"] == "singleton" and len(ranks) == 1


def test_gather_writer_same_layout(tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    for path, writer in ((a, "parallel"), (b, "gather")):
        proc = mpirun(2, "run", "--trace-writer", writer, "--out", str(path), "--", FWQ,
                      "--samples", "10", "--quantum-us", "50")
        assert proc.returncode == 0, proc.stderr
    with h5py.File(a) as fa, h5py.File(b) as fb:
        names_a, names_b = [], []
        fa.visit(names_a.append)
        fb.visit(names_b.append)
        assert names_a == names_b
        assert fa["noise/fwq_ns"].shape == fb["noise/fwq_ns"].shape


def test_rank_that_raises_aborts_the_job_quickly(tmp_path):
    app = tmp_path / "boom.py"
    app.write_text(
        "import time\nfrom mpi4py import MPI\n"
        "if MPI.COMM_WORLD.Get_rank() == 1:\n    raise ValueError('rank one failed')\n"
        "MPI.COMM_WORLD.Barrier()\n"
    )
    t0 = time.monotonic()
    proc = mpirun(2, "run", "--out", str(tmp_path), "--", str(app), timeout=30)
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 10
    assert "ValueError: rank one failed" in proc.stderr
    assert not list(tmp_path.glob("*.h5"))
    left = subprocess.run(["pgrep", "-f", str(app)], capture_output=True, text=True)
    assert left.stdout == ""


def test_app_sys_exit_code_propagates(tmp_path):
    app = tmp_path / "leave.py"
    app.write_text("import sys\nsys.exit(3)\n")
    proc = mpirun(2, "run", "--out", str(tmp_path), "--", str(app), timeout=30)
    assert proc.returncode == 3


def test_module_and_argv(tmp_path):
    pkg = tmp_path / "argv_probe.py"
    pkg.write_text("import sys, mckmpi\nctx = mckmpi.context()\n"
                   "print('ARGV', sys.argv[1:], ctx.harness, ctx.placement.rank)\n")
    env = job_env(PYTHONPATH=str(tmp_path))
    proc = mckmpi("run", "--out", str(tmp_path), "-m", "argv_probe", "--", "a", "--b", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "ARGV ['a', '--b'] True 0" in proc.stdout


def test_binary_runs_pinned_as_the_rank_child_and_its_failure_aborts(tmp_path):
    proc = mckmpi("run", "--out", str(tmp_path), "--", "/bin/grep", "Cpus_allowed_list",
                  "/proc/self/status")
    assert proc.returncode == 0, proc.stderr
    plan = _partition_show("--ranks", "1")[0]
    assert proc.stdout.split()[-1] == format_cpulist(plan["ranks"][0]["cpus"])
    assert len(list(tmp_path.glob("*.h5"))) == 1  # the harness outlived it: a run file
    failed = mckmpi("run", "--out", str(tmp_path), "--", "/bin/false")
    assert failed.returncode == 1 and "/bin/false exited with status 1" in failed.stderr


MPI_HELLO = """
#include <mpi.h>
#include <stdio.h>
int main(int argc, char **argv) {
    int rank, size;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    printf("HELLO %d of %d\\n", rank, size);
    MPI_Finalize();
    return 0;
}
"""


def test_an_mpi_binary_is_the_rank_itself(tmp_path):
    src, exe = tmp_path / "hello.c", tmp_path / "hello"
    src.write_text(MPI_HELLO)
    subprocess.run(["mpicc", "-O1", "-o", str(exe), str(src)], check=True, timeout=60)
    assert app_module.links_mpi(exe) and not app_module.links_mpi(Path("/bin/cp"))
    assert app_module.resolve_app([str(exe)], None).kind == "mpi-binary"
    proc = mpirun(2, "run", "--out", str(tmp_path), "--", str(exe))
    assert proc.returncode == 0, proc.stderr
    assert sorted(l for l in proc.stdout.splitlines() if l.startswith("HELLO")) == [
        "HELLO 0 of 2", "HELLO 1 of 2"]
    # Recorded from outside: placement, wall time, exit; what is not measured is said.
    assert "not measured: noise, memory" in proc.stderr
    (path,) = tmp_path.glob("hello-linux-*.h5")
    assert not list(tmp_path.glob(".*.ranks"))  # the fragments are gone
    with open_run(path) as r:
        ranks = r.ranks
        assert list(ranks["rank"]) == [0, 1] and list(ranks["node"]) == [0, 0]
        assert r.read("app/exit_code").tolist() == [0, 0]
        assert (r.read("app/wall_ns") > 0).all()
        assert "not_measured" in r.file["app"].attrs
        assert r.attrs["world_size"] == 2 and r.attrs["missing_ranks"] == ""
        assert r.provenance["app_sha256"] and r.provenance["node_hostname"]
    failing = tmp_path / "fail.c"
    failing.write_text(MPI_HELLO.replace("return 0;", "return rank == 1 ? 3 : 0;"))
    subprocess.run(["mpicc", "-O1", "-o", str(tmp_path / "fail"), str(failing)], check=True,
                   timeout=60)
    out = tmp_path / "fail.h5"
    proc = mpirun(2, "run", "--out", str(out), "--", str(tmp_path / "fail"))
    assert proc.returncode != 0
    with open_run(out) as r:
        assert r.read("app/exit_code").tolist() == [0, 3]


MPI_ABORT = """
#include <mpi.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int rank;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    if (rank == 1)
        MPI_Abort(MPI_COMM_WORLD, 5);
    MPI_Barrier(MPI_COMM_WORLD);  /* rank 0 waits here until the job is torn down */
    MPI_Finalize();
    return 0;
}
"""


def _mpicc(tmp_path: Path, name: str, source: str) -> Path:
    src, exe = tmp_path / f"{name}.c", tmp_path / name
    src.write_text(source)
    subprocess.run(["mpicc", "-O1", "-o", str(exe), str(src)], check=True, timeout=60)
    return exe


def test_an_mpi_binarys_own_abort_is_recorded_with_its_errorcode_and_rank(tmp_path):
    exe = _mpicc(tmp_path, "aborts", MPI_ABORT)
    out = tmp_path / "aborts.h5"
    proc = mpirun(2, "run", "--out", str(out), "--", str(exe), timeout=90)
    assert proc.returncode == 5, proc.stderr
    lines = proc.stderr.splitlines()
    assert "mckmpi: error: rank 1 called MPI_Abort with errorcode 5" in lines, proc.stderr
    # Rank 0 outlived the launcher's SIGTERM and wrote the complete run file.
    assert not list(tmp_path.glob(".*.ranks")) and not list(tmp_path.glob("*.partial"))
    with open_run(out) as r:
        a = r.attrs
        assert (a["ending"], a["exit_status"], a["ending_rank"]) == ("aborted", 5, 1), a
        assert a["error"] == "rank 1 called MPI_Abort with errorcode 5"
        assert a["missing_ranks"] == ""
        assert r.read("app/exit_code").tolist()[1] == 5


MPI_SLEEP = """
#include <mpi.h>
#include <stdio.h>
#include <unistd.h>
int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    MPI_Barrier(MPI_COMM_WORLD);
    fclose(fopen(argv[1], "w"));  /* every rank is in: the test may signal the job */
    sleep(60);
    MPI_Finalize();
    return 0;
}
"""


def test_an_mpi_binary_job_terminated_by_sigterm_keeps_its_run_file(tmp_path):
    exe = _mpicc(tmp_path, "sleeps", MPI_SLEEP)
    out, started = tmp_path / "sleeps.h5", tmp_path / "started"
    launch = Job(("-m", "mckmpi", "run", "--out", str(out), "--", str(exe), str(started)), 2,
                 options=None).render("mpiexec")
    proc = subprocess.Popen(launch.argv, env=launch.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.exists(), proc.stderr.read() if proc.poll() is not None else "no start"
        proc.send_signal(signal.SIGTERM)  # as Ctrl-C or a batch system's cancel does
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    assert proc.returncode != 0
    # Every rank noted the signal instead of dying of it; rank 0 wrote the file in time.
    with open_run(out) as r:
        a = r.attrs
        assert (a["ending"], a["signal"], a["exit_status"]) == ("signal", "SIGTERM", 143), err
        assert r.read("app/exit_code").tolist() == [143, 143] and a["missing_ranks"] == ""
    assert not list(tmp_path.glob(".*.ranks")) and not list(tmp_path.glob("*.partial"))


def test_the_abort_recorder_is_preloaded_for_the_program_only(tmp_path):
    recorder = external.abort_recorder()
    assert recorder is not None and recorder.is_file(), "build it: setup.py build_ext --inplace"
    # Ahead of the user's own preload, which stays.
    env = external.child_env(tmp_path, {"LD_PRELOAD": "/usr/lib/libuser.so", "PATH": "/bin"})
    assert env["LD_PRELOAD"] == f"{recorder}:/usr/lib/libuser.so"
    assert env[external.ABORT_RECORD_VARIABLE] == str(tmp_path)
    # A process that is not an MPI program loads it (no libmpi needed, every symbol bound
    # at once) and runs as without it; nothing is recorded.
    env = external.child_env(tmp_path, {"PATH": "/usr/bin:/bin", "LD_BIND_NOW": "1"})
    for argv, status in ((["/bin/true"], 0), (["/bin/sh", "-c", "exit 3"], 3)):
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30,
                              check=False)
        assert (done.returncode, done.stdout, done.stderr) == (status, "", "")
    maps = subprocess.run(["/bin/cat", "/proc/self/maps"], env=env, capture_output=True,
                          text=True, timeout=30, check=True).stdout
    assert str(recorder) in maps  # it was loaded
    assert list(tmp_path.iterdir()) == []
    # Another process's record (a program the MPI program started) is not this child's.
    (tmp_path / "12345").write_text("9\n")
    assert external.read_abort_record(tmp_path, 12345) == 9
    assert external.read_abort_record(tmp_path, 12346) is None


def test_bare_app_runs_without_harness():
    proc = subprocess.run(["mpiexec", "-n", "2", sys.executable, FWQ, "--samples", "5", "--quantum-us", "50"],
                          capture_output=True, text=True, timeout=60, env=job_env())
    assert proc.returncode == 0, proc.stderr
    assert "fwq: 2 ranks" in proc.stdout
