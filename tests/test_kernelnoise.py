"""Kernel noise attribution: parsing the kernel's counters, and the run file's kernel/* tables
checked against /proc/interrupts deltas taken outside and inside the recorded window."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from fixtures import mckmpi, mpirun
from mckmpi.analysis import kernel
from mckmpi.node import kernelnoise as kn
from mckmpi.node.host import read_host
from mckmpi.trace.reader import open_run

INTERRUPTS = """\
           CPU0       CPU2
 24:          1          7  IO-APIC   5-edge      ACPI:Ged
 36:          0      42264  PCI-MSIX-0000:00:02.0   1-edge      virtio1-req.0, other dev
NMI:          0          0   Non-maskable interrupts
LOC:      36666      41565   Local timer interrupts
IPI0:        10         20   Rescheduling interrupts
ERR:          0
MIS:          0
"""

SOFTIRQS = """\
                    CPU0       CPU2
          HI:          0          0
       TIMER:       5175       8308
"""

STAT = """\
cpu  14057 0 4212 35536 219 0 35 11 0 0
cpu0 3462 1 1534 22036 11 0 10 3 0 0
cpu2 10595 0 2677 13500 207 0 25 7 0 0
intr 701603 0 0
ctxt 2615177
"""


def test_interrupts_are_parsed_per_cpu_column_with_device_names():
    lines = {(ln.kind, ln.source): ln for ln in kn.parse_interrupts(INTERRUPTS)}
    assert set(lines) == {("device", "24"), ("device", "36"), ("arch", "NMI"), ("arch", "LOC"),
                          ("arch", "IPI0")}  # ERR/MIS have no per-CPU counts
    assert lines[("device", "36")].counts == {0: 0, 2: 42264}
    assert lines[("device", "36")].description == "virtio1-req.0, other dev"
    assert lines[("arch", "LOC")].description == "Local timer interrupts"
    soft = kn.parse_softirqs(SOFTIRQS)
    assert [(s.source, s.counts) for s in soft] == [("HI", {0: 0, 2: 0}),
                                                   ("TIMER", {0: 5175, 2: 8308})]


def test_stat_times_are_nanoseconds_per_cpu():
    stat = kn.parse_stat(STAT)
    assert set(stat) == {0, 2}
    tick = 1_000_000_000 // __import__("os").sysconf("SC_CLK_TCK")
    assert stat[0]["nice"] == tick and stat[2]["steal"] == 7 * tick


def test_task_stat_with_parentheses_in_the_name():
    fields = ["S", "77"] + ["0"] * 34 + ["3"] + ["0"] * 10
    t = kn.parse_task(5, 6, "6 (a) b (c) " + " ".join(fields), "1000 200 7\n")
    assert (t.comm, t.ppid, t.cpu, t.run_ns, t.wait_ns, t.slices) == ("a) b (c", 77, 3, 1000, 200, 7)


def _snap(t: int, interrupts: str, tasks: dict[int, kn.TaskSample] | None = None) -> kn.Snapshot:
    return kn.Snapshot(t, kn.parse_interrupts(interrupts), kn.parse_stat(STAT), tasks or {})


def test_deltas_count_new_lines_from_zero_and_keep_only_the_given_cpus():
    before = _snap(0, INTERRUPTS)
    after_text = INTERRUPTS.replace("36666", "36700").replace(
        "NMI:", " 50:          3          4  PCI-MSIX x-edge  newdev\nNMI:")
    rows = kn.interrupt_deltas(before, _snap(10, after_text), [0])
    got = {(r["kind"].decode(), r["source"].decode()): int(r["count"]) for r in rows}
    assert got == {("arch", "LOC"): 34, ("device", "50"): 3}
    assert set(rows["window"]) == {b"app"}
    assert set(rows["cpu"]) == {0}


def test_tasks_are_attributed_to_their_last_cpu_and_owner():
    def task(pid: int, tid: int, ppid: int, cpu: int, run: int) -> kn.TaskSample:
        return kn.TaskSample(pid, tid, ppid, f"t{tid}", cpu, run, 0, 1)

    before = _snap(0, INTERRUPTS, {1: task(1, 1, 0, 0, 100), 2: task(2, 2, 1, 2, 50),
                                   3: task(3, 3, 1, 2, 10)})
    after = _snap(10, INTERRUPTS, {1: task(1, 1, 0, 2, 160), 2: task(2, 2, 1, 2, 50),
                                   3: task(9, 3, 40, 2, 5), 4: task(4, 4, 40, 0, 8)})
    rows = kn.task_deltas(before, after, [2], job_pids={40})
    got = [(int(r["tid"]), r["owner"].decode(), int(r["run_ns"])) for r in rows]
    # tid 2 did not run; tid 3 is a new task with a reused id; tid 4 ended on another CPU
    assert got == [(1, "other", 60), (3, "job", 5)]


def test_osnoise_status_names_what_is_missing(tmp_path: Path):
    assert "not mounted" in kn.osnoise_status([tmp_path / "nothing"], kernel_configs=[])
    (tmp_path / "available_tracers").write_text("blk function nop\n")
    assert "no osnoise tracer" in kn.osnoise_status([tmp_path])


def test_osnoise_status_tells_a_kernel_without_the_tracer_from_an_unmounted_tracefs(
        tmp_path: Path):
    """Without tracefs mounted, the kernel's build configuration says which one it is."""
    import gzip

    nothing = [tmp_path / "no-tracefs"]
    without = tmp_path / "config.gz"
    with gzip.open(without, "wt") as fh:
        fh.write("CONFIG_TRACING=y\n# CONFIG_OSNOISE_TRACER is not set\n")
    status = kn.osnoise_status(nothing, kernel_configs=[tmp_path / "missing", without])
    assert "built without the osnoise tracer" in status and str(without) in status
    assert "not mounted" not in status
    built = tmp_path / "config-release"
    built.write_text("CONFIG_OSNOISE_TRACER=y\n")
    status = kn.osnoise_status(nothing, kernel_configs=[built])
    assert "tracefs is not mounted" in status and "the kernel has the osnoise tracer" in status
    assert "is unknown" in kn.osnoise_status(nothing, kernel_configs=[tmp_path / "missing"])


def test_proc_files_read_the_current_text_each_time():
    files = kn.ProcFiles()
    try:
        first = kn.snapshot(files=files, tasks=False)
        second = kn.snapshot(files=files, tasks=False)
    finally:
        files.close()
    loc = {ln.source: ln for ln in second.lines}["LOC"]
    assert second.t_ns > first.t_ns and sum(loc.counts.values()) >= sum(
        {ln.source: ln for ln in first.lines}["LOC"].counts.values())
    assert set(second.stat) == set(kn.parse_stat(Path("/proc/stat").read_text()))


TRACE = """\
# tracer: nop
#
          python-10487   [000] dNs6.  1176.639146: ipi_send_cpu: cpu=1 callsite=wakeup_preempt+0x92/0xa0 callback=0x0
 kworker/0:1 a-11   [000] ...2.  1176.645273: ipi_send_cpumask: cpumask=0-3 callsite=on_each_cpu_cond_mask+0x20/0x60 callback=generic_smp_call_function_single_interrupt+0x0/0x10
         mpiexec-10470   [000] ...3.  1177.000000: csd_queue_cpu: cpu=1 callsite=on_each_cpu_cond_mask+0x20/0x60 func=flush_tlb_func csd=00000000a
          python-10487   [000] dNs6.  1178.5: ipi_send_cpu: cpu=1 callsite=wakeup_preempt+0x92/0xa0 callback=0x0
"""


def test_ipi_trace_is_counted_per_target_sender_and_window():
    from mckmpi.node import ipitrace

    events = ipitrace.parse_trace(TRACE, [1, 2])
    assert [t for t, _ in events] == [1176639146000, 1176645273000, 1176645273000,
                                      1177000000000, 1178500000000]
    rows = ipitrace.rows(events, {10470}, {"app": (0, 2 * 10**12),
                                           "measured": (1176_700_000_000, 1178_000_000_000)})
    got = {(r["window"].decode(), int(r["cpu"]), r["sender"].decode(), r["owner"].decode(),
            r["callsite"].decode(), r["function"].decode()): int(r["count"]) for r in rows}
    assert got == {
        ("app", 1, "python", "other", "wakeup_preempt", ""): 2,
        ("app", 1, "kworker/0:1 a", "other", "on_each_cpu_cond_mask",
         "generic_smp_call_function_single_interrupt"): 1,
        ("app", 2, "kworker/0:1 a", "other", "on_each_cpu_cond_mask",
         "generic_smp_call_function_single_interrupt"): 1,
        ("app", 1, "mpiexec", "job", "on_each_cpu_cond_mask", "flush_tlb_func"): 1,
        ("measured", 1, "mpiexec", "job", "on_each_cpu_cond_mask", "flush_tlb_func"): 1,
    }


#: Inside the recorded window: the app copies /proc/interrupts at its start and its end, and
#: marks a measured phase in between (what the noise benchmarks do through appkit).
INNER_APP = """\
import sys, time
from pathlib import Path
import mckmpi
from mckmpi import appkit
out = Path(sys.argv[1])
(out / "inner-start.txt").write_text(Path("/proc/interrupts").read_text())

def spin():
    end = time.monotonic() + 0.5
    while time.monotonic() < end:
        pass

appkit.run_phases(mckmpi.context(), spin)
(out / "inner-end.txt").write_text(Path("/proc/interrupts").read_text())
"""


def _counts(text: str) -> dict[tuple[str, str, int], int]:
    return {(ln.kind, ln.source, cpu): n for ln in kn.parse_interrupts(text)
            for cpu, n in ln.counts.items()}


@pytest.mark.parametrize("mode", ["linux", "lwk"])
def test_run_file_interrupts_lie_between_the_apps_and_the_tests_deltas(tmp_path: Path, mode: str):
    """The recorded window encloses the app and lies inside the test's own window, so for every
    line and CPU: app's delta <= recorded delta <= test's delta (no timing assumption)."""
    app = tmp_path / "inner.py"
    app.write_text(INNER_APP)
    run_file = tmp_path / "run.h5"
    mounted_before = Path("/sys/kernel/tracing/instances").is_dir()
    outer_start = Path("/proc/interrupts").read_text()
    proc = mpirun(1, "run", "--mode", mode, "--offload", "none", "--out", str(run_file), "--",
                  str(app), str(tmp_path), timeout=120)
    outer_end = Path("/proc/interrupts").read_text()
    assert proc.returncode == 0, proc.stderr
    inner = {k: v - _counts((tmp_path / "inner-start.txt").read_text()).get(k, 0)
             for k, v in _counts((tmp_path / "inner-end.txt").read_text()).items()}
    o0 = _counts(outer_start)
    outer = {k: v - o0.get(k, 0) for k, v in _counts(outer_end).items()}
    with open_run(run_file) as run:
        cpus = run.table("kernel/cpus")
        rows = run.table("kernel/interrupts")
        assert len(run.table("kernel/tasks")) > 0  # at least the rank itself ran
        traced = run.group_attrs("kernel")["ipis"]
        if os.geteuid() == 0 and traced.startswith("traced"):
            ipis = run.table("kernel/ipis")
            assert set(ipis["window"]) <= {b"app", b"measured"} and (ipis["count"] > 0).all()
    # the trace instance is gone, and tracefs mounted only if it was before
    assert Path("/sys/kernel/tracing/instances").is_dir() == mounted_before
    if mounted_before:  # no instance of a process that is gone
        assert not [p for p in Path("/sys/kernel/tracing/instances").glob("mckmpi-*")
                    if not Path(f"/proc/{p.name.removeprefix('mckmpi-')}").exists()]
    assert sorted(cpus["cpu"].tolist()) == sorted(read_host().cpus * 2)  # both windows
    app_rows = rows[rows["window"] == b"app"]
    recorded = {(r["kind"].decode(), r["source"].decode(), int(r["cpu"])): int(r["count"])
                for r in app_rows if r["kind"] != b"softirq"}
    measured = {(r["kind"].decode(), r["source"].decode(), int(r["cpu"])): int(r["count"])
                for r in rows[rows["window"] == b"measured"] if r["kind"] != b"softirq"}
    assert measured and all(n <= recorded.get(k, 0) for k, n in measured.items())
    for key in set(inner) | set(recorded):
        if key[2] in cpus["cpu"]:
            assert inner.get(key, 0) <= recorded.get(key, 0) <= outer.get(key, 0), key
    assert sum(inner.get(("arch", "LOC", int(c)), 0) for c in cpus["cpu"]) > 0
    for c in cpus:
        mine = rows[(rows["cpu"] == c["cpu"]) & (rows["kind"] != b"softirq")
                    & (rows["window"] == c["window"])]
        assert c["interrupts"] == mine["count"].sum()
        assert 0 < c["window_ns"]
        assert (c["switches"] >= 0) == (c["window"] == b"app")  # root: perf counters, app window


def test_report_and_compare_show_the_kernel_tables(tmp_path: Path):
    runs = [tmp_path / "linux.h5", tmp_path / "lwk.h5"]
    app = tmp_path / "busy.py"
    app.write_text("import time\nend = time.monotonic() + 0.3\nwhile time.monotonic() < end:\n    pass\n")
    for mode, out in zip(("linux", "lwk"), runs):
        proc = mpirun(1, "run", "--mode", mode, "--offload", "none", "--out", str(out), "--",
                      str(app), timeout=120)
        assert proc.returncode == 0, proc.stderr
    report = mckmpi("report", str(runs[1]))
    assert report.returncode == 0, report.stderr
    assert "what interrupted each core" in report.stdout and "Local timer interrupts" in report.stdout
    data = json.loads(mckmpi("report", "--json", str(runs[1])).stdout)
    assert data["kernel"]["cores"] and data["kernel"]["attrs"]["osnoise"]
    assert data["kernel"]["window"] == "app"  # busy.py marks no measured phase
    with open_run(runs[1]) as run:
        cores = kernel.cores(run)
        assert kernel.windows(run) == ["app"] and kernel.cores(run, "measured") == []
    assert any(c.ranks for c in cores) and all(c.window_ns > 0 for c in cores)
    compared = mckmpi("compare", str(runs[0]), str(runs[1]))
    assert compared.returncode == 0, compared.stderr
    assert "IPIs (RES+CAL+TLB) per rank core" in compared.stdout
    assert np.isfinite(kernel.per_rank_core(cores)["LOC"][1])
