"""Post-processing commands: report (and, with them, the other analysis commands)."""

from __future__ import annotations

import argparse

from mckmpi.frontend.registry import command


# --- report --------------------------------------------------------------------------------


@command("report", "tables of what a run file holds")
def _build_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_file", help="an HDF5 run file written by mckmpi run")


@_build_report.run
def _cmd_report(args: argparse.Namespace) -> int:
    from mckmpi.analysis.report import text
    from mckmpi.trace.reader import open_run

    with open_run(args.run_file) as run:
        print(text(run))
    return 0
