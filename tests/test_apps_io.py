"""The allreduce latency loop and the checkpointing app under the harness."""

from __future__ import annotations

import numpy as np
import pytest

from mckmpi.trace.reader import open_run
from test_apps import LAYOUTS, run_app

SIZES = (8, 1024, 65536)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_allreduce_latency_table(layout, tmp_path):
    n = 30
    extra = ["--work-us", "20"] if layout == "2" else []
    _, out = run_app(tmp_path, layout, "allreduce", "--sizes", ",".join(map(str, SIZES)),
                     "--iterations", str(n), *extra)
    with open_run(out) as run:
        size = run.world_size
        attrs = run.group_attrs("app")
        rows = [run.table("app/allreduce", r) for r in range(size)]
        assert run.units("app/allreduce", "ns") == "ns" and run.units("app/allreduce", "bytes") == "B"
    assert attrs["name"] == "allreduce" and attrs["verified"]
    assert list(attrs["sizes"]) == list(SIZES)
    for r in rows:
        assert len(r) == len(SIZES) * n
        assert list(r["bytes"]) == [s for s in SIZES for _ in range(n)]
        assert list(r["iter"]) == list(range(n)) * len(SIZES)
        assert (r["ns"] > 0).all() and (r["ns"] < 1e9).all()
        if extra:
            assert (r["work_ns"] >= 0.9 * 20_000).all()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_checkpoint_reads_back_and_restarts(layout, tmp_path):
    n, every, elements = 12, 4, 30_000
    mode = ["--async"] if layout in ("4-oversubscribed", "vnodes2", "lwk-4-oversubscribed",
                                    "lwk-vnodes2") else []
    ckpt_dir = tmp_path / "ckpt"
    _, out = run_app(tmp_path, layout, "checkpoint", "--elements", str(elements), "--iterations",
                     str(n), "--every", str(every), "--dir", str(ckpt_dir), *mode)
    with open_run(out) as run:
        size = run.world_size
        attrs = run.group_attrs("app")
        stall, base = run.read("app/ckpt_ns"), run.read("app/base_iter_ns")
        it, comp, comm = (run.read(f"app/{k}") for k in ("iter_ns", "compute_ns", "comm_ns"))
        tables = [run.table("app/checkpoints", r) for r in range(size)]
        rates = run.scalars("app/throughput_base"), run.scalars("app/throughput_ckpt")
    expected = "sync" if not mode else "channel" if layout.startswith("lwk") else "thread"
    assert attrs["verified"] and attrs["async_mode"] == expected
    for a in (stall, base, it, comp, comm):
        assert a.shape == (size, n) and a.dtype == np.int64
    assert (it >= comp + comm + stall).all()
    taken = (np.arange(n) + 1) % every == 0
    assert (stall[:, taken] > 0).all()
    for t in tables:
        assert list(t["iter"]) == [4, 8, 12]
        assert (t["bytes"] == elements * 8).all() and (t["write_ns"] > 0).all()
        assert (np.diff(t["start_ns"]) > 0).all()
    assert all((r > 0).all() for r in rates)
    assert ckpt_dir.is_dir() and not list(ckpt_dir.iterdir())  # own files removed, --dir kept


def test_checkpoint_keep_leaves_the_last_two_checkpoints(tmp_path):
    ckpt_dir = tmp_path / "keep"
    run_app(tmp_path, "2", "checkpoint", "--elements", "1000", "--iterations", "9", "--every", "3",
            "--dir", str(ckpt_dir), "--keep", "--fsync")
    files = sorted(p.name for p in ckpt_dir.iterdir())
    assert files == ["ckpt-r00000-0.bin", "ckpt-r00000-1.bin", "ckpt-r00001-0.bin", "ckpt-r00001-1.bin"]
    assert all((ckpt_dir / f).stat().st_size == 8000 for f in files)
    state = np.fromfile(ckpt_dir / "ckpt-r00000-0.bin")
    assert ((state > 0) & (state < 1)).all()
