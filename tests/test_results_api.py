"""Results in pandas and xarray in one call: `mckmpi.open_run(path).to_xarray()` /
`.to_pandas(name)` and `mckmpi.open_study(dir)` give exactly what the reader reads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_analysis import write_synthetic

import mckmpi
from mckmpi.analysis import study
from mckmpi.errors import UsageError
from mckmpi.trace.reader import open_run
from mckmpi.trace.schema import SCHEMA_VERSION


def _decoded(values: np.ndarray) -> list:
    return [v.decode() if isinstance(v, bytes) else v for v in values.tolist()]


@pytest.mark.parametrize("name", ["fwq-lwk", "detour-linux", "allreduce-linux", "checkpoint-lwk"])
def test_tables_equal_the_readers_arrays(result_runs, name):
    with mckmpi.open_run(result_runs[name]) as run:
        tables = [k for k in run.datasets() if run[k].attrs["kind"] == "table"]
        assert tables
        for key in tables + ["ranks"]:
            frame, rows = run.to_pandas(key), run.read(key)
            assert list(frame.columns) == list(rows.dtype.names)
            for field in rows.dtype.names:
                assert frame[field].tolist() == _decoded(rows[field]), (key, field)
            assert all(frame.attrs["units"][f] == run.units(key, f)
                       for f in rows.dtype.names if run.units(key, f))
        short = tables[0].rsplit("/", 1)[-1]
        assert run.to_pandas(short).equals(run.to_pandas(tables[0]))


def test_group_scalars_and_arrays_equal_the_readers_arrays(result_runs):
    with mckmpi.open_run(result_runs["fwq-lwk"]) as run:
        memory = run.to_pandas("memory")
        assert memory["rank"].tolist() == [0]
        for name in ("peak", "size", "boot_ns", "fragmentation"):
            assert memory[name].tolist() == run.scalars(f"memory/{name}").tolist()
        assert memory["allocator"].tolist() == ["tlsf"]
        assert memory.attrs["units"]["peak"] == "B"
    with mckmpi.open_run(result_runs["fwq-linux"]) as run:
        samples = run.read("noise/fwq_ns")
        long = run.to_pandas("noise/fwq_ns")
        assert list(long.columns) == ["rank", "sample", "fwq_ns"]
        assert len(long) == samples.size
        pivot = long.pivot(index="rank", columns="sample", values="fwq_ns").to_numpy()
        assert np.array_equal(pivot, samples)
        with pytest.raises(UsageError, match="no table 'nope'.*noise/fwq_ns"):
            run.to_pandas("nope")


def test_to_xarray_is_a_dataset_per_group_with_provenance(result_runs):
    with mckmpi.open_run(result_runs["checkpoint-lwk"]) as run:
        groups = run.to_xarray()
        assert {"/", "app", "memory", "scheduler", "offload"} <= set(groups)
        app = groups["app"]
        assert app["ckpt_ns"].dims == ("rank", "iteration")
        assert app["base_iter_ns"].dims == ("rank", "base_iteration")
        assert np.array_equal(app["ckpt_ns"].values, run.read("app/ckpt_ns"))
        assert app["ckpt_ns"].attrs["units"] == "ns"
        assert app["checkpoints_write_ns"].dims == ("checkpoint",)
        assert np.array_equal(app["checkpoints_write_ns"].values, run.read("app/checkpoints")["write_ns"])
        calls = groups["offload"]
        assert calls["calls_call"].values.tolist() == _decoded(run.read("offload/calls")["call"])
        assert calls["calls_trap_ns"].attrs["units"] == "ns"
        assert app.attrs["mode"] == "lwk" and app.attrs["name"] == "checkpoint"
        assert app.attrs["provenance_python"] == run.provenance["python"]
        root = groups["/"]
        assert root["host"].dims == ("rank",) and root["rank"].values.tolist() == [0]
        assert run.to_xarray("app").equals(app)
        with pytest.raises(UsageError, match="no group 'nope'"):
            run.to_xarray("nope")


def test_labelled_files_list_only_recorded_data(tmp_path):
    path = write_synthetic(tmp_path / "v2.h5", fwq=np.arange(50) + 1000)
    with open_run(path) as run:
        assert run.attrs["schema_version"] == SCHEMA_VERSION
        assert run.members("noise") == ["fwq_ns"]
        assert sorted(run.datasets()) == ["app/wall_ns", "noise/fwq_ns", "ranks"]
        assert [s.name for s in run["noise/fwq_ns"].dims[1].values()] == ["/noise/sample"]


def test_open_study_of_a_directory_and_of_a_study_file(result_runs, tmp_path):
    directory = next(iter(result_runs.values())).parent
    s = mckmpi.open_study(directory)
    runs = s.to_pandas()
    collected = study.collect(directory).rows
    assert len(runs) == len(collected) == len(result_runs)
    assert runs["path"].tolist() == _decoded(collected["path"])
    assert np.allclose(runs["wall_s"], collected["wall_s"], equal_nan=True)
    assert [p.name for p in s.run_paths()] == [Path(p).name for p in runs["path"]]
    assert all(p.is_file() for p in s.run_paths())
    summary = s.to_pandas("points")
    assert len(summary) == len(study.points(collected))
    assert set(summary["metric"]) <= set(study.METRICS)
    ds = s.to_xarray()
    assert ds.sizes["run"] == len(runs) and ds["wall_s"].attrs["units"] == "s"
    saved = study.write(collected, tmp_path / "study.h5", source=str(directory))
    again = mckmpi.open_study(saved)
    assert again.to_pandas().equals(runs) and again.run_paths() == s.run_paths()
    with pytest.raises(UsageError, match="two tables, 'runs' and 'points'"):
        s.to_pandas("calls")


def test_the_ranks_never_import_pandas_or_xarray():
    code = ("import sys, mckmpi, mckmpi.runner, mckmpi.trace.reader, mckmpi.trace.writer; "
            "assert not {'pandas', 'xarray', 'h5netcdf'} & set(sys.modules), sys.modules.keys(); "
            "assert callable(mckmpi.open_run) and callable(mckmpi.open_study)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0, proc.stderr
