"""Run files of every schema version read alike: version 3 stores tables one dataset per
column and booleans as int8 flags (so netCDF-C sees them), versions 2 (HDF5 compound
datasets and enums, labelled) and 1 (the same, unlabelled) still read, and `to_pandas`,
`to_xarray` and the reader's arrays are the same whichever version holds the data.

tests/data/run-v2.h5 was written by mckmpi 0.1.0 at schema version 2 (commit 0923b55) with
``write_synthetic(path, mode="lwk", **V2_INPUTS)`` of tests/test_analysis.py, and
tests/data/study-v2.h5 (study schema version 2) by the same code with
``study.write(study.collect(DIR).rows, path, source=".")`` on a directory holding only
run-v2.h5. Study files changed alike: version 3 stores their tables one dataset per column."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_analysis import DETOUR_DTYPE, offload_calls, write_synthetic

import mckmpi
from mckmpi.analysis import study
from mckmpi.analysis.repeats import CI_METHOD
from mckmpi.trace import writer
from mckmpi.trace.labels import unlabel
from mckmpi.trace.reader import RunFileError, is_complete
from mckmpi.trace.schema import RANKS_DTYPE, SCHEMA_VERSION
from mckmpi.trace.tracer import Tracer

V2_FILE = Path(__file__).parent / "data" / "run-v2.h5"
V2_STUDY = Path(__file__).parent / "data" / "study-v2.h5"


def _detours() -> np.ndarray:
    det = np.zeros(3, dtype=DETOUR_DTYPE)
    det["start_ns"], det["duration_ns"] = [1_000, 5_000, 9_000], [200, 250, 3_000]
    return det


V2_INPUTS = {
    "fwq": np.arange(40, dtype=np.int64) + 1_000_000,
    "detours": _detours(),
    "span_ns": 10**6,
    "calls": offload_calls(),
    "scalars": {"memory/locked": True, "memory/peak": 4096, "offload/zero_copy": False},
}
TABLES = ["ranks", "noise/detours", "offload/calls"]
FRAMES = TABLES + ["memory", "offload", "noise/fwq_ns", "detours", "calls"]


@pytest.fixture
def v3(tmp_path) -> Path:
    return write_synthetic(tmp_path / "run-v3.h5", mode="lwk", **V2_INPUTS)


def test_version_3_stores_no_compound_or_enum_dataset(v3):
    found = []
    with h5py.File(v3, "r") as f:
        assert f.attrs["schema_version"] == SCHEMA_VERSION == 3
        f.visititems(lambda n, o: found.append((n, o.dtype)) if isinstance(o, h5py.Dataset)
                     else None)
        calls = f["offload/calls"]
        assert isinstance(calls, h5py.Group) and calls.attrs["kind"] == "table"
        assert list(calls.attrs["columns"]) == ["rank", *offload_calls().dtype.names]
        assert calls["trap_ns"].attrs["units"] == "ns"
        assert [s.name for s in calls["trap_ns"].dims[0].values()] == ["/offload/offload_call"]
        assert [s.name for s in f["ranks/host"].dims[0].values()] == ["/rank"]
        locked = f["memory/locked"]
        assert locked.dtype == np.int8 and locked[0] == 1
        assert list(locked.attrs["flag_values"]) == [0, 1]
        assert locked.attrs["flag_meanings"] == "false true"
    assert not [n for n, dtype in found if dtype.names or h5py.check_enum_dtype(dtype)]


def test_version_2_file_reads_as_it_was_written():
    with h5py.File(V2_FILE, "r") as f:
        assert f.attrs["schema_version"] == 2
        stored = {key: f[key][()] for key in TABLES + ["memory/locked", "offload/zero_copy"]}
    with mckmpi.open_run(V2_FILE) as run:
        for key in TABLES:
            assert run.read(key).dtype == stored[key].dtype
            assert np.array_equal(run.read(key), stored[key]), key
            frame = run.to_pandas(key)
            for field in stored[key].dtype.names:
                values = stored[key][field].tolist()
                values = [v.decode() if isinstance(v, bytes) else v for v in values]
                assert frame[field].tolist() == values, (key, field)
        assert run.read("memory/locked").dtype == bool and run.scalars("memory/locked").tolist() == [True]
        assert run.to_pandas("memory")["locked"].tolist() == [True]
        assert run.row_offsets("offload/calls").tolist() == [0, 6]
        assert sorted(run.datasets()) == sorted(
            ["app/wall_ns", "memory/locked", "memory/peak", "noise/detour_span_ns",
             "noise/detour_threshold_ns", "noise/detours", "noise/fwq_ns", "offload/calls",
             "offload/zero_copy", "ranks"])


def _same_tables(old: Path, new: Path) -> None:
    with mckmpi.open_run(old) as a, mckmpi.open_run(new) as b:
        assert a.attrs["schema_version"] < b.attrs["schema_version"] == SCHEMA_VERSION
        assert sorted(a.datasets()) == sorted(b.datasets())
        for key in a.datasets():
            assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
            assert a.kind(key) == b.kind(key), key
            assert a.dataset_attrs(key).get("filled") == b.dataset_attrs(key).get("filled")
            if key != "ranks":  # pid and clock of the writing process
                assert np.array_equal(a.read(key), b.read(key)), key
        for name in FRAMES:
            fa, fb = a.to_pandas(name), b.to_pandas(name)
            if name == "ranks":
                fa, fb = fa.drop(columns=["pid", "clock_rtt_ns"]), fb.drop(columns=["pid", "clock_rtt_ns"])
            assert fa.equals(fb), (name, fa, fb)
            assert list(fa.dtypes) == list(fb.dtypes), name
            assert fa.attrs["units"] == fb.attrs["units"], name
        xa, xb = a.to_xarray(), b.to_xarray()
        assert sorted(xa) == sorted(xb)
        for group in ("noise", "offload", "memory"):
            assert xa[group].equals(xb[group]), group
            assert all(xa[group][v].attrs == xb[group][v].attrs for v in xa[group].variables)


def test_tables_of_version_3_equal_those_of_version_2(v3):
    _same_tables(V2_FILE, v3)


def test_unlabelled_version_1_files_still_read(tmp_path, v3):
    old = tmp_path / "run-v1.h5"
    shutil.copy(V2_FILE, old)
    with h5py.File(old, "r+") as f:
        unlabel(f)  # version 1: the same datasets, without dimension scales
        for ds in ("noise/detours", "offload/calls", "ranks"):
            for name in [a for a in f[ds].attrs if a.startswith("units")]:
                del f[ds].attrs[name]
        f.attrs["schema_version"] = 1
        assert "sample" not in f["noise"] and not f["noise/fwq_ns"].dims[0].keys()
    with mckmpi.open_run(old) as run:
        noise = run.to_xarray("noise")
        assert noise["fwq_ns"].dims == ("rank", "sample")
        assert noise["detours_duration_ns"].dims == ("detour",)
        assert noise["detours_duration_ns"].values.tolist() == [200, 250, 3_000]
        assert run.to_pandas("offload/calls")["errno"].tolist() == [0, 0, 0, 0, 2, 0]
        assert run.members("noise") == ["detour_span_ns", "detour_threshold_ns", "detours", "fwq_ns"]


def test_a_table_with_a_boolean_column_is_flags_on_disk_and_bool_in_the_reader(tmp_path):
    from mpi4py import MPI

    t = Tracer()
    t.scalar("", "ranks", np.zeros((), dtype=RANKS_DTYPE))
    rows = np.zeros(3, dtype=[("ok", "?"), ("n", "i8")])
    rows["ok"], rows["n"] = [True, False, True], [1, 2, 3]
    t.table("app", "checks", rows, units={"n": "count"})
    t.array("app", "hits", np.array([True, False]))
    path = writer.write_run(MPI.COMM_SELF, tmp_path / "b.h5", t, {"world_size": 1}, {},
                            method="gather")
    with h5py.File(path, "r") as f:
        assert f["app/checks/ok"].dtype == np.int8 and f["app/checks/ok"][()].tolist() == [1, 0, 1]
        assert f["app/checks/ok"].attrs["flag_meanings"] == "false true"
        assert "units" not in f["app/checks/ok"].attrs and f["app/checks/n"].attrs["units"] == "count"
    with mckmpi.open_run(path) as run:
        table = run.read("app/checks")
        assert table.dtype == np.dtype([("rank", "i4"), ("ok", "?"), ("n", "i8")])
        assert table["ok"].tolist() == [True, False, True] and run.units("app/checks", "n") == "count"
        assert run.read("app/checks", "ok").dtype == bool
        assert run.table("app/checks", 0)["n"].tolist() == [1, 2, 3]
        assert run["app/hits"][0].tolist() == [True, False]
        assert run.to_pandas("checks")["ok"].tolist() == [True, False, True]
        assert run.to_xarray("app")["checks_ok"].dtype == bool


def test_a_table_missing_a_column_is_one_clear_error(v3):
    with h5py.File(v3, "r+") as f:
        del f["offload/calls/errno"]
    with mckmpi.open_run(v3) as run, pytest.raises(RunFileError,
                                                   match="'offload/calls' lacks its column 'errno'"):
        run.read("offload/calls")


def _compound_or_enum(path: Path) -> list[str]:
    found: list[str] = []
    with h5py.File(path, "r") as f:
        f.visititems(lambda n, o: found.append(n) if isinstance(o, h5py.Dataset) and (
            o.dtype.names or h5py.check_enum_dtype(o.dtype)) else None)
    return found


def test_study_files_of_version_2_read_as_before_and_version_3_holds_the_same(tmp_path):
    with h5py.File(V2_STUDY, "r") as f:
        assert f.attrs["schema_version"] == 2
        stored_runs, stored_points = f["runs"][()], f["points"][()]
    runs, pts = study.read(V2_STUDY), study.read_points(V2_STUDY)
    assert runs.dtype == stored_runs.dtype == study.STUDY_DTYPE and len(runs) == 1
    assert pts.dtype == stored_points.dtype == study.POINTS_DTYPE and len(pts) == 3
    for got, want in ((runs, stored_runs), (pts, stored_points)):
        for name in want.dtype.names:
            np.testing.assert_array_equal(got[name], want[name])  # NaN == NaN here
    again = study.write(runs, tmp_path / "study-v3.h5", source=".")
    assert _compound_or_enum(again) == [] and _compound_or_enum(V2_STUDY) == ["points", "runs"]
    with h5py.File(again, "r") as f:
        assert f.attrs["schema_version"] == study.STUDY_VERSION == 3
        assert [s.name for s in f["runs/path"].dims[0].values()] == ["/run"]
        assert [s.name for s in f["points/median"].dims[0].values()] == ["/point_metric"]
        assert f["points"].attrs["ci_method"] == CI_METHOD
    for got, want in ((study.read(again), runs), (study.read_points(again), pts)):
        assert got.dtype == want.dtype
        for name in want.dtype.names:
            np.testing.assert_array_equal(got[name], want[name])
    old, new = mckmpi.open_study(V2_STUDY), mckmpi.open_study(again)
    assert old.to_pandas().equals(new.to_pandas())
    assert old.to_pandas("points").equals(new.to_pandas("points"))


def test_boolean_attributes_of_a_fresh_run_read_as_bool(result_runs):
    path = result_runs["cg-linux"]
    with h5py.File(path, "r") as f:
        assert f.attrs["complete"].dtype == np.int8 and f["app"].attrs["verified"] == 1
    assert is_complete(path, h5py.File(path, "r").attrs)
    with mckmpi.open_run(path) as run:
        assert run.attrs["complete"] is True and "boolean_attributes" not in run.attrs
        app = run.group_attrs("app")
        assert app["verified"] is True and app["converged"] is True
        assert isinstance(app["tolerance"], float) and "boolean_attributes" not in app
        assert run.provenance["shared_hosts"] is False
        attrs = run.to_xarray("app").attrs
        assert attrs["complete"] is True and attrs["verified"] is True
        assert attrs["provenance_shared_hosts"] is False


def test_version_2_boolean_attributes_still_read_as_bool():
    with h5py.File(V2_FILE, "r") as f:
        assert f.attrs.get_id("complete").get_type().get_class() == h5py.h5t.ENUM
        assert "boolean_attributes" not in f.attrs
    with mckmpi.open_run(V2_FILE) as run:
        assert run.attrs["complete"] is True


def test_an_apps_own_boolean_attributes_read_back_as_bool(tmp_path):
    path = write_synthetic(tmp_path / "own.h5", app_attrs={
        "name": "own", "verified": False, "converged": np.bool_(True),
        "flags": [True, False], "count": 1, "none": None})
    with h5py.File(path, "r") as f:
        app = f["app"].attrs
        assert app["converged"].dtype == np.int8 and list(app["flags"]) == [1, 0]
        assert sorted(app["boolean_attributes"]) == ["converged", "flags", "verified"]
    with mckmpi.open_run(path) as run:
        app = run.group_attrs("app")
        assert app["verified"] is False and app["converged"] is True
        assert app["flags"] == [True, False]
        assert app["count"] == 1 and not isinstance(app["count"], bool)
        assert app["none"] == ""


def test_enum_boolean_attributes_of_earlier_files_read_as_bool(v3):
    with h5py.File(v3, "r+") as f:  # as the first version 3 files stored them
        f.attrs["complete"] = True
        del f.attrs["boolean_attributes"]
        f.require_group("app").attrs["verified"] = False
        assert f.attrs.get_id("complete").get_type().get_class() == h5py.h5t.ENUM
    with mckmpi.open_run(v3) as run:
        assert run.attrs["complete"] is True and run.group_attrs("app")["verified"] is False


@pytest.mark.parametrize("value", [2, -1, "yes"])
def test_a_boolean_attribute_of_another_value_is_one_line(v3, value):
    with h5py.File(v3, "r+") as f:
        f.require_group("app").attrs["verified"] = value
    with mckmpi.open_run(v3) as run:
        with pytest.raises(RunFileError, match="attribute 'verified' of /app is .*expected a boolean"):
            run.group_attrs("app")
