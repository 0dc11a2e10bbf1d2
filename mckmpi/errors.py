"""Exceptions that carry a user-facing message.

Every command ends through one error path (`mckmpi.frontend.cli.main`): an `MckmpiError` is
printed as one line ``mckmpi: error: ...`` on stderr, with exit status 2 for a `UsageError`
(bad options, impossible partitions, missing kernel features: the user can fix the command)
and 1 for a `RunError` (the command was right, the run failed: a proxy died, a file could
not be written). Anything else is a bug or an application failure and keeps its traceback.
"""

import difflib
from collections.abc import Iterable

#: The prefix of every error line mckmpi prints.
PREFIX = "mckmpi: error: "


class MckmpiError(Exception):
    """An error with a one-line message for the user."""

    exit_code = 1

    def line(self) -> str:
        """The one line printed for this error: the message, never a second prefix."""
        return error_line(str(self))


class UsageError(MckmpiError):
    """A mistake the user can fix: printed as one line, exit status 2."""

    exit_code = 2


class RunError(MckmpiError):
    """A run that failed for a reason outside the command line: one line, exit status 1."""

    exit_code = 1


class PlacementError(UsageError):
    """The launcher's view of ranks and nodes contradicts what MPI reports."""


class PartitionError(UsageError):
    """The requested core/memory partition cannot be built on this node."""


class FeatureUnavailable(UsageError):
    """The kernel or the environment lacks a feature a requested mode needs."""


class StorageError(UsageError):
    """The run file cannot be written (a full or failing file system): one line naming the
    path and the errno, agreed by every rank, exit status 74 (EX_IOERR)."""

    exit_code = 74

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


def error_line(message: str) -> str:
    """``mckmpi: error: MESSAGE`` on one line, whatever prefixes or newlines `message` has.

    Messages pass through several hands (a proxy's line relayed by a rank, an exception
    wrapped by its caller): a prefix already present is not repeated, and a message that
    spans lines is joined, so the user always sees exactly one line.
    """
    text = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    while text.startswith(PREFIX) or text.startswith("mckmpi: "):
        text = text[len(PREFIX):] if text.startswith(PREFIX) else text[len("mckmpi: "):]
    return PREFIX + (text or "failed")


def did_you_mean(word: str, known: Iterable[str], prefix: str = "") -> str:
    """': did you mean 'X'?' for the known name closest to a mistyped `word`, else ''.
    A `prefix` all names share ('--', 'MCKMPI_') is left out of the likeness, so that it
    does not make every name look close."""
    def bare(name: str) -> str:
        return name[len(prefix):] if prefix and name.startswith(prefix) else name

    names = {bare(name): name for name in known}
    close = difflib.get_close_matches(bare(word), sorted(names), n=1, cutoff=0.6)
    return f": did you mean {names[close[0]]!r}?" if close else ""
