"""Exceptions that carry a user-facing message.

The CLI prints a `UsageError` as one line and exits 2 (no traceback): bad options, impossible
partitions, missing kernel features. Anything else is a bug or an application failure and
keeps its traceback.
"""


class UsageError(Exception):
    """A mistake the user can fix: printed as one line, exit status 2."""

    exit_code = 2


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
