"""The apps' shared kit in-process: option types, noise injection, timer limits, grids."""

from __future__ import annotations

import argparse
import importlib.util

import numpy as np
import pytest

from fixtures import APPS
from mckmpi import appkit


def test_noise_spec_parses_and_prints_back():
    spec = appkit.noise_spec("1000:10")
    assert (spec.freq_hz, spec.duration_ns, spec.ranks, spec.period_ns) == (1000, 10_000, None, 1_000_000)
    assert spec.text() == "1000:10:all"
    spec = appkit.noise_spec("50:2000:3,0-1")
    assert spec.ranks == (0, 1, 3) and spec.text() == "50:2000:0,1,3"
    assert appkit.noise_spec("2.5:1.5:all").text() == "2.5:1.5:all"


@pytest.mark.parametrize("text,message", [
    ("1000", "FREQ_HZ:DURATION_US"),
    ("x:10", "positive frequency"),
    ("10:0", "positive duration"),
    ("1000:1000", "leaves no time to compute"),
    ("10:5:1-x", "ranks must look like"),
])
def test_noise_spec_rejects(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        appkit.noise_spec(text)


def test_injector_takes_owed_detours_in_one_spin():
    spec = appkit.noise_spec("1000:50")
    inj = appkit.Injector(spec, rank=0, sync=False)
    assert inj.active and inj.due == appkit.NEVER
    inj.due = appkit.clock() - 3 * spec.period_ns - 10_000  # over three periods late
    due = inj.due
    inj.fire()
    assert inj.count == 4 and inj.stolen_ns >= 4 * 50_000
    assert inj.due == due + 4 * spec.period_ns > appkit.clock() - spec.period_ns


def test_injector_phases_and_selection():
    spec = appkit.noise_spec("100:10:1")
    assert not appkit.Injector(spec, rank=0, sync=False).active
    phases = {appkit.Injector(appkit.noise_spec("100:10"), r, False).phase_ns for r in range(8)}
    assert len(phases) == 8 and all(0 <= p < 10_000_000 for p in phases)
    assert appkit.Injector(spec, rank=1, sync=True).phase_ns == 10_000_000
    idle = appkit.Injector(None, rank=0, sync=False)
    assert not idle.active and idle.due == appkit.NEVER


def test_timer_limits():
    assert appkit.TimerStats(40, 30).min_quantum_ns == 10_000
    assert appkit.TimerStats(300, 1000).min_quantum_ns == 50_000
    measured = appkit.measure_timer(reads=2000, trials=2)
    assert 0 < measured.cost_ns < 100_000 and measured.resolution_ns > 0


@pytest.mark.parametrize("fn,text,value", [
    (appkit.positive_int, "3", 3), (appkit.nonnegative_int, "0", 0),
    (appkit.positive_float, "0.5", 0.5), (appkit.byte_size, "4K", 4096),
    (appkit.byte_sizes, "8,1M", (8, 1 << 20)), (appkit.shape, "64x32", (64, 32)),
])
def test_option_types(fn, text, value):
    assert fn(text) == value


@pytest.mark.parametrize("fn,text", [
    (appkit.positive_int, "0"), (appkit.nonnegative_int, "-1"), (appkit.positive_float, "nan"),
    (appkit.byte_size, "lots"), (appkit.shape, "64x-1"), (appkit.byte_sizes, ","),
])
def test_option_types_reject(fn, text):
    with pytest.raises(argparse.ArgumentTypeError):
        fn(text)


def _grid(argv: list[str], ndim: int, nranks: int) -> appkit.Grid:
    p = appkit.parser("t", None)
    appkit.add_grid_options(p, "8", "16")
    return appkit.plan_grid(p, p.parse_args(argv), ndim, nranks, min_points=8,
                            local_default=8, size_default=16)


def test_grid_plans():
    g = _grid([], 2, 4)
    assert g.dims == (2, 2) and g.local_shape == (8, 8) and g.global_shape == (16, 16)
    g = _grid(["--scaling", "strong", "--size", "48x16x8"], 3, 3)
    assert g.dims == (3, 1, 1) and g.local_shape == (16, 16, 8)
    with pytest.raises(SystemExit) as exc:
        _grid(["--scaling", "strong", "--size", "20"], 2, 3)
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        _grid(["--local", "4"], 2, 1)  # below the minimum size
    with pytest.raises(SystemExit):
        _grid(["--size", "16"], 2, 1)  # --size is for strong scaling


def _stencil_module():
    spec = importlib.util.spec_from_file_location("stencil_app", APPS / "stencil.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("local", [(1, 1), (2, 5), (6, 6), (1, 4, 3), (5, 2, 7)])
def test_stencil_regions_cover_every_point_once(local):
    interior, shell = _stencil_module().regions(local)
    hits = np.zeros(tuple(n + 2 for n in local), dtype=int)
    for reg in [interior, *shell]:
        hits[reg] += 1
    inner = tuple(slice(1, n + 1) for n in local)
    ghosts = hits.copy()
    ghosts[inner] = 0
    assert not ghosts.any()
    counts = hits[inner]
    # A one-point-thick axis has one layer that is both first and last: updated once.
    assert (counts == 1).all(), np.argwhere(counts != 1)[:3]
