"""What the apps in apps/ share: options, clocks, the work kernel, noise injection, grids.

Every app runs under the harness (`mckmpi run -- apps/X.py`) and bare (`mpiexec -n 2
python apps/X.py`). So that an app can never hang when it rejects its options, every rank
validates the same options the same way before any communication, rank 0 alone prints the
one-line error, and every rank exits with status 2. Checks that need a measurement (a
quantum below the timer's resolution) combine the measurements of all ranks first, so the
verdict is still the same everywhere.

Timed loops allocate nothing: buffers come from `ctx.mem` (the LWK arena in lwk mode) before
the loop, the work is numpy kernels writing into preallocated outputs, and times are int64
nanoseconds of CLOCK_MONOTONIC (`clock`), the clock of the run file.
"""

from mckmpi.appkit.grid import Grid, Halo, add_grid_options, global_coords, plan_grid
from mckmpi.appkit.inject import Injector, injector
from mckmpi.appkit.kernel import KERNEL_ELEMENTS, WorkKernel, reps_for
from mckmpi.appkit.options import (AppParser, NoiseSpec, byte_size, byte_sizes,
                                   check_noise_ranks, noise_spec, nonnegative_float,
                                   nonnegative_int, parser, positive_float, positive_int, shape,
                                   world_rank)
from mckmpi.appkit.phases import VerificationError, run_phases, stream_phases, verify_all
from mckmpi.appkit.timing import (MIN_QUANTUM_NS, NEVER, QUANTUM_PER_STEP, TimerStats,
                                  agreed_timer, clock, measure_timer, ms)

__all__ = [
    "AppParser", "Grid", "Halo", "Injector", "KERNEL_ELEMENTS", "MIN_QUANTUM_NS", "NEVER",
    "NoiseSpec", "QUANTUM_PER_STEP", "TimerStats", "VerificationError", "WorkKernel",
    "add_grid_options", "agreed_timer", "byte_size", "byte_sizes", "check_noise_ranks",
    "clock", "global_coords", "injector", "measure_timer", "ms", "noise_spec",
    "nonnegative_float", "nonnegative_int", "parser", "plan_grid", "positive_float",
    "positive_int", "reps_for", "run_phases", "shape", "stream_phases", "verify_all",
    "world_rank",
]
