"""Parsing and printing of the quantities users type: memory sizes and CPU lists."""

from __future__ import annotations

import re
from collections.abc import Iterable

from mckmpi.errors import UsageError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b)?\s*$", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}


def parse_size(text: str | int) -> int:
    """Bytes from '512M', '2G', '1.5GiB' or a plain byte count (binary units, as Slurm's --mem)."""
    if isinstance(text, int):
        value = text
    else:
        m = _SIZE.match(text)
        if not m:
            raise UsageError(f"not a size: {text!r} (use bytes or a suffix K, M, G, T: 512M, 2G)")
        value = int(float(m.group(1)) * 1024 ** _POWERS[m.group(2).lower()])
    if value <= 0:
        raise UsageError(f"size must be positive: {text!r}")
    return value


def format_size(n: int) -> str:
    """The shortest exact binary-unit spelling: 268435456 -> '256M'."""
    for suffix, power in (("T", 4), ("G", 3), ("M", 2), ("K", 1)):
        unit = 1024**power
        if n >= unit and n % unit == 0:
            return f"{n // unit}{suffix}"
    if n >= 1024**2:
        return f"{n / 1024**2:.1f}M"
    return str(n)


#: More CPU ids than any Linux kernel supports (NR_CPUS is at most 8192 today): the bound
#: of a CPU list read from anywhere, so a list never expands into gigabytes.
MAX_CPUS = 1 << 16


def parse_cpulist(text: str, limit: int = MAX_CPUS) -> tuple[int, ...]:
    """CPU ids from the kernel's list syntax ('0-3,8,10-11'), sorted and unique.

    Every id must be below `limit` (the node's CPU count where it is known): ranges are
    checked before they are expanded, so '0-99999999' is an error, not 8 GB of integers.
    """
    ranges: list[tuple[int, int]] = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        m = re.fullmatch(r"([0-9]+)(?:-([0-9]+))?", part)
        if not m:
            raise UsageError(f"not a CPU list: {_cut(text)} (use ids and ranges: 0-3,8)")
        lo = _cpu_id(m.group(1))
        hi = _cpu_id(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise UsageError(f"descending CPU range {part!r} in {_cut(text)}")
        if hi >= limit:
            cpu = _cut(part.rpartition("-")[2], 20)[1:-1]
            where = (f"this node has CPUs 0-{limit - 1}" if limit < MAX_CPUS
                     else f"no Linux kernel has more than {MAX_CPUS} CPUs")
            raise UsageError(f"CPU {cpu} in {_cut(text)} does not exist: {where}")
        ranges.append((lo, hi))
    cpus: set[int] = set()
    for lo, hi in ranges:
        cpus.update(range(lo, hi + 1))
    return tuple(sorted(cpus))


def _cpu_id(digits: str) -> int:
    """A CPU id; one too long to be any CPU (or to convert: Python refuses integers of more
    than 4300 digits) counts as beyond every limit."""
    return int(digits) if len(digits) <= 18 else 10**18


def _cut(text: str, limit: int = 40) -> str:
    return repr(text) if len(text) <= limit else repr(text[:limit - 3] + "...")


def format_cpulist(cpus: Iterable[int]) -> str:
    """The kernel's compact list syntax: (0, 1, 2, 5) -> '0-2,5'."""
    ids = sorted(set(cpus))
    parts: list[str] = []
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        parts.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(parts)


def parse_cpumask(text: str) -> tuple[int, ...]:
    """CPU ids from a hex mask as Slurm writes them ('0x5' -> (0, 2))."""
    value = int(text, 16)
    return tuple(i for i in range(value.bit_length()) if value >> i & 1)
