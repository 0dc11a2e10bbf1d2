"""Run files read by generic tools, without mckmpi: xarray through h5netcdf and ncdump see
named dimensions and units on every dataset. This module imports nothing from mckmpi; the
reading happens in a fresh interpreter that checks it never loaded mckmpi."""

from __future__ import annotations

import json
import subprocess
import sys

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
                    list(var.dims), {k: str(v) for k, v in var.attrs.items() if k.startswith("units")},
                    var.dtype.kind, dict(ds.sizes)]
    out[path] = seen
assert not any(m == "mckmpi" or m.startswith("mckmpi.") for m in sys.modules), "mckmpi was imported"
print(json.dumps(out))
"""

#: Per app: dataset -> (dimension names, units or {field: units}).
EXPECTED = {
    "fwq-linux": {"noise/fwq_ns": (["rank", "sample"], "ns")},
    "fwq-lwk": {"noise/fwq_ns": (["rank", "sample"], "ns"), "memory/peak": (["rank"], "B"),
                "memory/boot_ns": (["rank"], "ns"), "offload/calls": (["offload_call"], {
                    "units:trap_ns": "ns", "units:bytes": "B", "units:fd": "1"})},
    "ftq-linux": {"noise/ftq_counts": (["rank", "interval"], "count"),
                  "noise/ftq_start_ns": (["rank", "interval"], "ns")},
    "detour-linux": {"noise/detours": (["detour"], {"units:start_ns": "ns",
                                                    "units:duration_ns": "ns"}),
                     "noise/detour_span_ns": (["rank"], "ns")},
    "stencil-linux": {"app/iter_ns": (["rank", "iteration"], "ns"),
                      "app/comm_ns": (["rank", "iteration"], "ns"), "app/error": (["rank"], "1")},
    "cg-linux": {"app/halo_ns": (["rank", "iteration"], "ns"), "app/residual": (["rank"], "1")},
    "allreduce-linux": {"app/allreduce": (["allreduce_call"], {"units:ns": "ns",
                                                               "units:iter": "1"})},
    "checkpoint-lwk": {"app/ckpt_ns": (["rank", "iteration"], "ns"),
                       "app/base_iter_ns": (["rank", "base_iteration"], "ns"),
                       "app/checkpoints": (["checkpoint"], {"units:write_ns": "ns"}),
                       "app/throughput_ckpt": (["rank"], "1/s"),
                       "offload/calls": (["offload_call"], {"units:done_ns": "ns"})},
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
        got_dims, got_units, _, _ = seen[key]
        assert got_dims == dims, (key, got_dims)
        if isinstance(units, str):
            assert got_units.get("units") == units, (key, got_units)
        else:
            assert units.items() <= got_units.items(), (key, got_units)
    # every group: the rank axis is a coordinate 0..N-1; every numeric value has units
    ranks = 1 if app.endswith("lwk") else 2
    for key, (dims, units, kind, sizes) in seen.items():
        assert not any(d.startswith("phony_dim") for d in dims), key
        if "rank" in sizes:
            assert sizes["rank"] == ranks, key
        if kind in "iuf" and key.rsplit("/", 1)[-1] != "rank":
            assert "units" in units, (key, units)
    assert seen["app/wall_ns"][:2] == [["rank"], {"units": "ns"}]
    assert seen["ranks"][0] == ["rank"]


def test_ncdump_shows_dimensions_and_units(result_runs):
    proc = subprocess.run(["ncdump", "-h", str(result_runs["stencil-linux"])], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "group: app {" in out and "rank = 2 ;" in out
    assert "iteration = UNLIMITED ; // (20 currently)" in out
    assert "int64 iter_ns(rank, iteration) ;" in out
    assert 'iter_ns:units = "ns" ;' in out
