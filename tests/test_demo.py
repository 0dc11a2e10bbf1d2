"""The main job: `mckmpi demo` (small sizes), and the layout it picks for a host."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fixtures import job_env, job_tag, mckmpi, tagged_processes
from mckmpi.demo import layout
from mckmpi.errors import UsageError


def test_layout_keeps_a_linux_core_and_oversubscribes_only_the_stencil():
    jobs = {(j.app, j.mode): j for j in layout(2, 100, 1.0)}
    assert jobs[("fwq", "linux")].ranks == 2 and jobs[("fwq", "lwk")].ranks == 1
    assert jobs[("detour", "lwk")].ranks == 1 and not jobs[("detour", "lwk")].oversubscribe
    assert jobs[("stencil", "lwk")].ranks == 2 and jobs[("stencil", "lwk")].oversubscribe
    big = {(j.app, j.mode): j for j in layout(8, 100, 1.0)}
    assert big[("fwq", "lwk")].ranks == 7 and big[("stencil", "lwk")].ranks == 8
    with pytest.raises(UsageError, match="at least 2 CPUs"):
        layout(1, 100, 1.0)


def test_isolated_layout_adds_an_lwk_run_without_isolation_per_app(tmp_path):
    runs = layout(2, 100, 1.0, isolate=True)
    by = {(r.app, r.column): r for r in runs}
    assert len(runs) == 9 and len(by) == 9
    for app in ("fwq", "detour", "stencil"):
        assert by[(app, "lwk")].isolate and not by[(app, "lwk-no-isolation")].isolate
        assert by[(app, "lwk")].ranks == by[(app, "lwk-no-isolation")].ranks
        assert not by[(app, "linux")].isolate
    assert dict(by[("fwq", "lwk")].job(tmp_path / "f.h5").options)["isolate"] is True
    assert "isolate" not in dict(by[("fwq", "lwk-no-isolation")].job(tmp_path / "g.h5").options)


def test_each_demo_run_is_one_job_of_the_source_trees_app(tmp_path):
    stencil = {(r.app, r.mode): r for r in layout(2, 100, 1.0)}[("stencil", "lwk")]
    job = stencil.job(tmp_path / "s.h5")
    assert (job.ranks, job.oversubscribe, job.vnodes) == (2, True, 1)
    assert dict(job.options) == {"mode": "lwk", "out": str(tmp_path / "s.h5")}
    assert job.app[0].endswith("apps/stencil.py") and job.app[1:] == stencil.args


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the demo needs 2 CPUs")
def test_demo_runs_compares_and_leaves_nothing_behind(tmp_path):
    out = tmp_path / "demo"
    tag = job_tag()
    proc = mckmpi("demo", "--out", str(out), "--samples", "300", "--detour-s", "0.5", timeout=300,
                  env=job_env(**tag))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "=== summary" in proc.stdout and "linux (A) vs lwk (B)" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert [h["app"] for h in summary["headlines"]] == ["fwq", "detour", "stencil"]
    assert all(h["linux"] > 0 and h["lwk"] > 0 for h in summary["headlines"])
    if os.geteuid() == 0:  # the third column: lwk without isolation
        assert all(h["lwk-no-isolation"] > 0 for h in summary["headlines"])
        assert "what the isolation adds" in proc.stdout
        assert (out / "fwq-lwk-no-isolation.h5").is_file()
        assert list(Path("/run/mckmpi").glob("run-*.isolation")) == []  # restored
    fwq = {c["metric"] for c in summary["comparisons"]["fwq"]}
    assert {"FWQ excess p50, median rank", "FWQ excess p99.9, worst rank",
            "FWQ noise fraction, mean of ranks"} <= fwq
    assert "app iteration p50 (slowest rank)" in {c["metric"] for c in summary["comparisons"]["stencil"]}
    for app in ("fwq", "detour", "stencil"):
        for mode in ("linux", "lwk"):
            assert (out / f"{app}-{mode}.h5").is_file()
        assert list((out / app).glob("*.png"))
    assert tagged_processes(tag) == []  # no rank, proxy or noise process of this demo
