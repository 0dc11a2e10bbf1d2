"""State files of what mckmpi changed on a node (cpuset reservations, isolation), written
before each change so that `release` restores exactly that, also after a crash: atomic
and durable JSON, a lock per state directory, a clear line for an unreadable file."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mckmpi.errors import UsageError


@contextmanager
def locked(state_dir: Path, name: str | None = None) -> Iterator[None]:
    """One holder at a time per state directory (or per lock file `name` in it); the kernel
    drops a dead holder's lock."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = (os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY) if name is None
          else os.open(state_dir / name, os.O_RDWR | os.O_CREAT, 0o600))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def save(path: Path, data: dict) -> None:
    """Atomically and durably: a crash leaves the previous or the new state, never half."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, json.dumps(data, indent=1).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(path: Path) -> None:
    """Delete a state file durably (the change it recorded is undone)."""
    path.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load(path: Path, what: str, fmt: int, remedy: str) -> dict | None:
    """The state in `path` (None when there is none), or one line saying what to do."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise UsageError(f"{what} state file {path} is unreadable ({exc}): {remedy}") from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise UsageError(f"{what} state file {path} is not in format {fmt}: {remedy}")
    return data
