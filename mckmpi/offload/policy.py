"""Which paths a rank offloads: `--offload io|none` and include/exclude path prefixes.

A path is matched as the rank names it, made absolute against the rank's cwd or dirfd and
normalised lexically (symlinks are not followed, so a link's name decides, not its target).
The longest matching prefix wins, an exclude beating an include of the same length; paths
matching nothing are offloaded. /proc is never offloaded whatever the policy: its
self-referential entries (/proc/self, /proc/thread-self) would describe the proxy, not the
rank. By default /sys and /dev stay native too, so MPI's shared-memory segments in /dev/shm
and the terminal stay with the rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from mckmpi.errors import UsageError

MODES = ("io", "none")
ALWAYS_NATIVE = ("/proc",)
DEFAULT_EXCLUDE = ("/proc", "/sys", "/dev")


def _is_under(path: str, prefix: str) -> bool:
    return prefix == "/" or path == prefix or path.startswith(prefix + "/")


def _clean(prefix: str, what: str) -> str:
    if not prefix.startswith("/"):
        raise UsageError(f"offload {what} prefix must be an absolute path, got {prefix!r}")
    return absolute("/", prefix)


@dataclass(frozen=True)
class Policy:
    """What a rank offloads. `mode='none'` means no filter at all."""

    mode: str = "io"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    _rules: tuple[tuple[int, int, str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UsageError(f"--offload must be one of {', '.join(MODES)}, got {self.mode!r}")
        include = tuple(_clean(p, "include") for p in self.include)
        exclude = tuple(_clean(p, "exclude") for p in self.exclude)
        for p in include:
            if any(_is_under(p, n) for n in ALWAYS_NATIVE):
                raise UsageError(f"cannot offload {p}: /proc always stays native (its /proc/self "
                                 f"entries would describe the proxy, not the rank)")
        object.__setattr__(self, "include", include)
        object.__setattr__(self, "exclude", exclude)
        # (length, exclude-first, prefix): sorted so the first match is the decisive one
        rules = [(len(p), 1, p) for p in exclude + ALWAYS_NATIVE] + [(len(p), 0, p) for p in include]
        object.__setattr__(self, "_rules", tuple(sorted(rules, reverse=True)))

    @property
    def active(self) -> bool:
        return self.mode != "none"

    def offloads(self, path: str) -> bool:
        """Whether the absolute, lexically normalised `path` is executed by the proxy."""
        for _, excluded, prefix in self._rules:
            if _is_under(path, prefix):
                return not excluded
        return True

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "include": list(self.include), "exclude": list(self.exclude)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Policy:
        return cls(mode=d["mode"], include=tuple(d["include"]), exclude=tuple(d["exclude"]))


def absolute(base: str, path: str) -> str:
    """`path` made absolute against directory `base` and normalised without touching the disk."""
    joined = path if path.startswith("/") else f"{base}/{path}"
    norm = os.path.normpath(joined)
    return "/" + norm.lstrip("/")
