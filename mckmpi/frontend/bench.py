"""`mckmpi bench NAME`: benchmarks as subcommands; numbers go to results/bench-NAME.json.

Each module of `mckmpi.bench` is one benchmark with `run(out_dir, quick) -> dict`; every
figure in it is measured next to a baseline taken in the same run, because shared machines
are noisy and only ratios compare across runs.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from pathlib import Path

import mckmpi.bench
from mckmpi.errors import UsageError
from mckmpi.frontend.registry import command


def _benchmarks() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(mckmpi.bench.__path__))


@command("bench", "run a benchmark and write its numbers to results/bench-NAME.json",
         "Run a benchmark: " + ", ".join(_benchmarks()) + ".\n\nEvery number is written next "
         "to the baseline measured in the same run and their ratio.")
def _build_bench(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="which benchmark: " + ", ".join(_benchmarks()))
    p.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    p.add_argument("--out", default="results", help="output directory [results]")


@_build_bench.run
def _cmd_bench(args: argparse.Namespace) -> int:
    if args.name not in _benchmarks():
        raise UsageError(f"unknown benchmark {args.name!r} (known: {', '.join(_benchmarks())})")
    module = importlib.import_module(f"mckmpi.bench.{args.name}")
    result = module.run(Path(args.out), quick=args.quick)
    # the scalars, also those one level down ("stencil.ratio"); lists stay in the file
    shown = {k: v for k, v in result.items() if isinstance(v, (int, float, str, bool))}
    for key, value in result.items():
        if isinstance(value, dict):
            shown.update({f"{key}.{k}": v for k, v in value.items()
                          if isinstance(v, (int, float, str, bool))})
    width = max((len(k) for k in shown), default=0)
    for key, value in shown.items():
        print(f"{key.ljust(width)}  {f'{value:.4g}' if isinstance(value, float) else value}")
    print(f"written: {Path(args.out) / f'bench-{args.name}.json'}")
    return 0
