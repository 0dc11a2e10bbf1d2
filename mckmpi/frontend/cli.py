"""The `mckmpi` command: parses, calls the library, prints.

Commands live in the modules of this package, one per concern (`core`: run, partition,
info, demo; `analysis`: report, ...), each registering with `@command`; every such module is
loaded here. Options shared by several commands are declared once in `mckmpi.config` with
their environment variables and config-file keys.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

import mckmpi.frontend
from mckmpi import __version__
from mckmpi.errors import UsageError
from mckmpi.frontend.registry import COMMANDS

_MODULES = sorted((m.name for m in pkgutil.iter_modules(mckmpi.frontend.__path__)
                   if m.name not in ("cli", "registry")), key=lambda name: (name != "core", name))
for _name in _MODULES:
    importlib.import_module(f"mckmpi.frontend.{_name}")


# --- entry point -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mckmpi",
        description="A user-space multi-kernel harness for MPI jobs: LWK partitions, syscall "
                    "offload, HDF5 traces of noise and scaling.",
        epilog="Every option can also be set as MCKMPI_<NAME> in the environment or in a TOML "
               "file (MCKMPI_CONFIG, ./mckmpi.toml, ~/.config/mckmpi/config.toml); the "
               "command line wins over the environment, which wins over the file.",
    )
    parser.add_argument("--version", action="version", version=f"mckmpi {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.summary, description=cmd.description,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        cmd.build(p)
        p.set_defaults(handler=cmd.handler)
    return parser


#: Options whose value is itself a command line and may begin with a dash
#: (`--sbatch-args '--account=proj42'`), which argparse would take for an option.
COMMAND_LINE_OPTIONS = ("--app-args", "--run-args", "--sbatch-args")


def glue_command_lines(argv: Sequence[str]) -> list[str]:
    """`--sbatch-args X` as `--sbatch-args=X`, so X may start with a dash (up to `--`)."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == "--":
            return out + list(argv[i:])
        if argv[i] in COMMAND_LINE_OPTIONS and i + 1 < len(argv):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = glue_command_lines(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except UsageError as exc:
        print(f"mckmpi: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("mckmpi: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
