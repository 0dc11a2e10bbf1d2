"""Run files read by generic tools, without mckmpi: xarray through h5netcdf and netCDF-C's
ncdump see every dataset, tables included (one variable per column), with named dimensions
and units, and every attribute (booleans are int8 0/1, named in ``boolean_attributes``).
This module imports nothing from mckmpi; the reading happens in a fresh interpreter that
checks it never loaded mckmpi."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import h5py
import pytest

READ_ALL = r"""
import json, sys, warnings
warnings.simplefilter("error")  # an unlabelled dataset is a 'phony_dims' warning
import h5py, xarray as xr
out = {}
for path in sys.argv[1:]:
    groups = ["/"]
    with h5py.File(path, "r") as f:
        f.visititems(lambda n, o: groups.append(n) if isinstance(o, h5py.Group) else None)
    seen = {}
    for g in groups:
        with xr.open_dataset(path, engine="h5netcdf", group=g) as ds:
            for name, var in ds.variables.items():
                seen[f"{g.strip('/')}/{name}".lstrip("/")] = [
                    list(var.dims), {k: str(v) for k, v in var.attrs.items()
                                     if k.startswith(("units", "flag_"))},
                    var.dtype.kind, dict(ds.sizes)]
    out[path] = seen
assert not any(m == "mckmpi" or m.startswith("mckmpi.") for m in sys.modules), "mckmpi was imported"
print(json.dumps(out))
"""

#: Per app: variable -> (dimension names, units); a table is a group of one variable per
#: column along its row dimension.
EXPECTED = {
    "fwq-linux": {"noise/fwq_ns": (["rank", "sample"], "ns")},
    "fwq-lwk": {"noise/fwq_ns": (["rank", "sample"], "ns"), "memory/peak": (["rank"], "B"),
                "memory/boot_ns": (["rank"], "ns"),
                "offload/calls/trap_ns": (["offload_call"], "ns"),
                "offload/calls/bytes": (["offload_call"], "B"),
                "offload/calls/fd": (["offload_call"], "1"),
                "offload/calls/rank": (["offload_call"], None)},
    "ftq-linux": {"noise/ftq_counts": (["rank", "interval"], "count"),
                  "noise/ftq_start_ns": (["rank", "interval"], "ns")},
    "detour-linux": {"noise/detours/start_ns": (["detour"], "ns"),
                     "noise/detours/duration_ns": (["detour"], "ns"),
                     "noise/detour_span_ns": (["rank"], "ns")},
    "stencil-linux": {"app/iter_ns": (["rank", "iteration"], "ns"),
                      "app/comm_ns": (["rank", "iteration"], "ns"), "app/error": (["rank"], "1")},
    "cg-linux": {"app/halo_ns": (["rank", "iteration"], "ns"), "app/residual": (["rank"], "1")},
    "allreduce-linux": {"app/allreduce/ns": (["allreduce_call"], "ns"),
                        "app/allreduce/iter": (["allreduce_call"], "1")},
    "checkpoint-lwk": {"app/ckpt_ns": (["rank", "iteration"], "ns"),
                       "app/base_iter_ns": (["rank", "base_iteration"], "ns"),
                       "app/checkpoints/write_ns": (["checkpoint"], "ns"),
                       "app/throughput_ckpt": (["rank"], "1/s"),
                       "offload/calls/done_ns": (["offload_call"], "ns"),
                       "memory/locked": (["rank"], None),
                       "ranks/host": (["rank"], None), "ranks/mem": (["rank"], "B")},
}


@pytest.fixture(scope="module")
def opened(result_runs) -> dict[str, dict]:
    paths = [str(result_runs[name]) for name in EXPECTED]
    proc = subprocess.run([sys.executable, "-c", READ_ALL, *paths], capture_output=True,
                          text=True, timeout=120, cwd="/", check=False)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    return {name: found[str(result_runs[name])] for name in EXPECTED}


@pytest.mark.parametrize("app", sorted(EXPECTED))
def test_xarray_sees_dimensions_and_units_without_mckmpi(opened, app):
    seen = opened[app]
    for key, (dims, units) in EXPECTED[app].items():
        got_dims, got_attrs, _, _ = seen[key]
        assert got_dims == dims, (key, got_dims)
        assert got_attrs.get("units") == units, (key, got_attrs)
    # every group: the rank axis is a coordinate 0..N-1; every numeric value has units, but
    # booleans, which are CF flags
    ranks = 1 if app.endswith("lwk") else 2
    for key, (dims, attrs, kind, sizes) in seen.items():
        assert not any(d.startswith("phony_dim") for d in dims), key
        if "rank" in sizes:
            assert sizes["rank"] == ranks, key
        if kind in "iuf" and key.rsplit("/", 1)[-1] != "rank":
            assert ("units" in attrs) != ("flag_meanings" in attrs), (key, attrs)
        if "flag_meanings" in attrs:
            assert kind == "i" and attrs["flag_meanings"] == "false true", (key, attrs)
    assert seen["app/wall_ns"][:2] == [["rank"], {"units": "ns"}]
    assert seen["ranks/rank"][0] == ["rank"] and seen["ranks/cpus"][0] == ["rank"]


#: A variable in ncdump -h: type, name, dimensions.
CDL_VARIABLE = re.compile(r"^\s+(?:u?byte|u?short|u?int|u?int64|float|double|char|string) "
                          r"(\w+)(?:\(([^)]*)\))? ;$")


def _cdl_variables(cdl: str) -> dict[str, list[str]]:
    """Every variable of ncdump -h output: its path (group/name) -> dimension names."""
    groups: list[str] = []
    found = {}
    for line in cdl.splitlines():
        if m := re.match(r"^\s*group: (\w+) \{$", line):
            groups.append(m.group(1))
        elif re.match(r"^\s*\} // group ", line):
            groups.pop()
        elif m := CDL_VARIABLE.match(line):
            dims = [d.strip() for d in (m.group(2) or "").split(",") if d.strip()]
            found["/".join([*groups, m.group(1)])] = dims
    return found


def _hdf5_variables(path) -> dict[str, int]:
    """What netCDF should show of a file: every dataset (path -> rank) but the dimensions
    that are no variable."""
    found = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            label = obj.attrs.get("NAME", b"") if isinstance(obj, h5py.Dataset) else b""
            label = label.decode() if isinstance(label, bytes) else str(label)
            if isinstance(obj, h5py.Dataset) and not label.startswith(
                    "This is a netCDF dimension but not a netCDF variable"):
                found[name] = obj.ndim
        f.visititems(visit)
    return found


@pytest.mark.parametrize("app", sorted(EXPECTED))
def test_ncdump_shows_every_dataset_and_table_of_every_app(result_runs, app):
    path = result_runs[app]
    proc = subprocess.run(["ncdump", "-h", str(path)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    shown = _cdl_variables(proc.stdout)
    stored = _hdf5_variables(path)
    assert shown.keys() == stored.keys(), (sorted(stored.keys() - shown.keys()),
                                            sorted(shown.keys() - stored.keys()))
    assert all(len(shown[k]) == n for k, n in stored.items())
    for key, (dims, _) in EXPECTED[app].items():
        assert shown[key] == dims, (key, shown[key])
    tables = {k.rsplit("/", 1)[0] for k, (dims, _) in EXPECTED[app].items()
              if dims[0] != "rank" and k.count("/") == 2}
    for table in tables:
        assert f"{table}/rank" in shown, table  # the flat table's rank column
    with h5py.File(path, "r") as f:
        assert not [n for n, _ in _typed(f) if n in shown], "compound or enum left"


def _typed(f: h5py.File) -> list[tuple[str, object]]:
    """Datasets netCDF-C cannot show: HDF5 compound and enum types."""
    found = []
    f.visititems(lambda n, o: found.append((n, o.dtype)) if isinstance(o, h5py.Dataset) and (
        o.dtype.names or h5py.check_enum_dtype(o.dtype)) else None)
    return found


def test_ncdump_shows_dimensions_and_units(result_runs):
    proc = subprocess.run(["ncdump", "-h", str(result_runs["checkpoint-lwk"])],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "group: app {" in out and "rank = 1 ;" in out
    assert "iteration = UNLIMITED ; // (8 currently)" in out
    assert "int64 iter_ns(rank, iteration) ;" in out
    assert 'iter_ns:units = "ns" ;' in out
    assert "group: calls {" in out and "int64 trap_ns(offload_call) ;" in out
    assert 'string call(offload_call) ;' in out and 'trap_ns:units = "ns" ;' in out
    assert "byte locked(rank) ;" in out and "locked:flag_values = 0b, 1b ;" in out
    assert 'locked:flag_meanings = "false true" ;' in out


def test_ncdump_shows_both_tables_of_a_study_file(result_runs, tmp_path):
    directory = next(iter(result_runs.values())).parent
    out = tmp_path / "study.h5"
    proc = subprocess.run([sys.executable, "-m", "mckmpi", "study", "collect", str(directory),
                           "-o", str(out)], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    dump = subprocess.run(["ncdump", "-h", str(out)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert dump.returncode == 0, dump.stderr
    shown = _cdl_variables(dump.stdout)
    assert shown.keys() == _hdf5_variables(out).keys()
    runs = len(result_runs)
    assert f"run = UNLIMITED ; // ({runs} currently)" in dump.stdout
    assert shown["runs/path"] == shown["runs/iter_us"] == ["run"]
    assert shown["points/median"] == shown["points/metric"] == ["point_metric"]
    with h5py.File(out, "r") as f:
        assert not _typed(f)


def _enum_attributes(f: h5py.File) -> list[str]:
    """Attributes netCDF-C leaves out: HDF5 enums (h5py's booleans)."""
    found = []

    def visit(name, obj):
        for key in obj.attrs:
            if obj.attrs.get_id(key).get_type().get_class() == h5py.h5t.ENUM:
                found.append(f"{name}:{key}")

    visit("/", f)
    f.visititems(visit)
    return found


def test_ncdump_shows_boolean_attributes(result_runs):
    path = result_runs["cg-linux"]
    proc = subprocess.run(["ncdump", "-h", str(path)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    root = out.split("group: ", 1)[0]
    assert ":complete = 1b ;" in root and 'string :boolean_attributes = "complete" ;' in root
    app = out.split("group: app {", 1)[1].split("} // group app", 1)[0]
    assert ":verified = 1b ;" in app and ":converged = 1b ;" in app
    listed = re.search(r'string :boolean_attributes = (.*) ;', app)
    assert listed and set(re.findall(r'"(\w+)"', listed.group(1))) == {"converged", "verified"}
    provenance = out.split("group: provenance {", 1)[1].split("} // group provenance", 1)[0]
    assert ":shared_hosts = 0b ;" in provenance
    for name, path in result_runs.items():
        with h5py.File(path, "r") as f:
            assert not _enum_attributes(f), name
