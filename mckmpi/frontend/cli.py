"""The `mckmpi` command: parses, calls the library, prints.

Commands live in the modules of this package, one per concern (`core`: run, partition,
info, demo; `analysis`: report, ...), each registering with `@command`; every such module is
loaded here. Options shared by several commands are declared once in `mckmpi.config` with
their environment variables and config-file keys.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import mckmpi.frontend
from mckmpi import __version__
from mckmpi.errors import MckmpiError, did_you_mean, error_line
from mckmpi.frontend.registry import COMMANDS

_MODULES = sorted((m.name for m in pkgutil.iter_modules(mckmpi.frontend.__path__)
                   if m.name not in ("cli", "registry")), key=lambda name: (name != "core", name))
for _name in _MODULES:
    importlib.import_module(f"mckmpi.frontend.{_name}")


#: Exit status of a command whose output was cut off (``mckmpi report RUN.h5 | head``): the
#: status a shell reports for a process ended by SIGPIPE, as `cat` would end.
EXIT_BROKEN_PIPE = 128 + 13


class Parser(argparse.ArgumentParser):
    """argparse with mckmpi's error line: one line naming the help to read, exit 2 (the
    stock parser prints the whole usage of `run`, a dozen lines, before the message)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, error_line(f"{message} (see `{self.prog} --help`)") + "\n")

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        """argparse's check of a choice, with the closest choice named (`runs qurey`:
        did you mean 'query'?)."""
        if action.choices is not None and value not in action.choices:
            choices = [str(c) for c in action.choices]
            raise argparse.ArgumentError(
                action, f"invalid choice: {value!r}{did_you_mean(str(value), choices)} "
                        f"(choose from {', '.join(choices)})")

    def unknown_arguments(self, extra: Sequence[str]) -> NoReturn:
        """`unrecognized arguments`, with the closest option named for a mistyped one."""
        options = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
        hints = [did_you_mean(t.split("=", 1)[0], options, "--") for t in extra
                 if t.startswith("--")]
        self.error(f"unrecognized arguments: {' '.join(extra)}{next(filter(None, hints), '')}")


# --- entry point -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
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
        p.set_defaults(handler=cmd.handler, command_parser=p)
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
    """The one error path of every command: an `MckmpiError` is one line and its exit status
    (2 usage, 1 runtime); an `OSError` the command did not expect (a full disk, a file that
    vanished) is one line and 1; a reader that went away ends the output quietly."""
    argv = glue_command_lines(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # named by the command's parser, so the line points at its --help
        args.command_parser.unknown_arguments(extra)
    try:
        status = int(args.handler(args) or 0)
        sys.stdout.flush()  # a closed pipe is found here, not at the interpreter's exit
        return status
    except MckmpiError as exc:
        print(exc.line(), file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_BROKEN_PIPE
    except OSError as exc:
        print(error_line(describe_os_error(exc)), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mckmpi: interrupted", file=sys.stderr)
        return 130


def describe_os_error(exc: OSError) -> str:
    """'PATH: reason' for an OSError, the way coreutils word it."""
    reason = exc.strerror or str(exc)
    names = [str(n) for n in (exc.filename, exc.filename2) if n is not None]
    return f"{' -> '.join(names)}: {reason}" if names else reason


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush into the closed pipe
    does not raise a second BrokenPipeError at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
