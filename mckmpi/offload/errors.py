"""Errors of the offload layer."""

from mckmpi.errors import UsageError


class OffloadError(UsageError):
    """The offload could not be set up or lost its proxy: one clear line for the user."""
