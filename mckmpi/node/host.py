"""Facts of the running host, read in one place: CPUs (cgroup cpuset, Slurm step), NUMA,
memory (meminfo, memory cgroup headroom), huge pages and transparent huge pages, cgroups.

Everything else computes with these facts passed in (the partition plan, the arena's boot
decisions, `mckmpi info`), so it stays testable without the host it describes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mckmpi.errors import PartitionError
from mckmpi.utility.units import parse_cpulist, parse_cpumask

THP = "/sys/kernel/mm/transparent_hugepage"


@dataclass(frozen=True)
class NodeFacts:
    """What the plan is computed from: the node's usable CPUs, NUMA layout and memory."""

    cpus: tuple[int, ...]
    numa: Mapping[int, tuple[int, ...]] = field(default_factory=dict)
    mem_available: int = 0

    def numa_of(self, cpu: int) -> int:
        for node, cpus in self.numa.items():
            if cpu in cpus:
                return node
        return 0

    def split(self, k: int) -> list[NodeFacts]:
        """K virtual nodes: contiguous CPU slices (NUMA nodes stay together when they can)
        and an equal share of memory each."""
        n = len(self.cpus)
        if k > n:
            raise PartitionError(f"--vnodes {k} needs at least {k} CPUs; this host allows {n}")
        return [
            NodeFacts(
                cpus=self.cpus[v * n // k:(v + 1) * n // k],
                numa=self.numa,
                mem_available=self.mem_available // k,
            )
            for v in range(k)
        ]



# --- CPUs, NUMA and memory of the node -------------------------------------------------


def cgroup_cpus(proc: Path = Path("/proc/self"), sysfs: Path = Path("/sys/fs/cgroup")) -> tuple[int, ...] | None:
    """The effective cpuset of this process's cgroup (v2 unified or v1 cpuset controller)."""
    try:
        lines = (proc / "cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hier, controllers, path = line.split(":", 2)
        if hier == "0" and controllers == "":
            candidates = [sysfs / path.lstrip("/"), sysfs / "unified" / path.lstrip("/")]
            names = ("cpuset.cpus.effective",)
        elif "cpuset" in controllers.split(","):
            candidates = [sysfs / "cpuset" / path.lstrip("/")]
            names = ("cpuset.effective_cpus", "cpuset.cpus")
        else:
            continue
        for directory in candidates:
            # Walk up: a child cgroup without the file inherits its parent's set.
            d = directory
            while True:
                for name in names:
                    f = d / name
                    if f.is_file():
                        text = f.read_text().strip()
                        if text:
                            return parse_cpulist(text)
                if d == sysfs or d.parent == d:
                    break
                d = d.parent
    return None


def slurm_step_cpus(env: Mapping[str, str]) -> tuple[int, ...] | None:
    """CPUs of this node's tasks of a Slurm step: the union of SLURM_CPU_BIND_LIST masks."""
    masks = env.get("SLURM_CPU_BIND_LIST")
    if not masks or "mask" not in env.get("SLURM_CPU_BIND_TYPE", "mask"):
        return None
    cpus: set[int] = set()
    for m in masks.split(","):
        if m.strip():
            cpus.update(parse_cpumask(m.strip()))
    return tuple(sorted(cpus)) or None


def numa_layout(sysfs: Path = Path("/sys/devices/system/node")) -> dict[int, tuple[int, ...]]:
    """NUMA node -> CPUs from sysfs; a machine without the directory is one node."""
    layout = {}
    for d in sorted(sysfs.glob("node[0-9]*")):
        try:
            layout[int(d.name[4:])] = parse_cpulist((d / "cpulist").read_text().strip())
        except OSError:
            continue
    return layout


def mem_available(meminfo: Path = Path("/proc/meminfo")) -> int:
    """MemAvailable in bytes: what can be reserved without pushing the node into reclaim."""
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def read_host(env: Mapping[str, str] = os.environ) -> NodeFacts:
    """The facts of this host as a job step sees them."""
    cpus = cgroup_cpus() or tuple(sorted(os.sched_getaffinity(0)))
    step = slurm_step_cpus(env)
    if step:
        cpus = tuple(c for c in cpus if c in step) or step
    return NodeFacts(cpus=cpus, numa=numa_layout(), mem_available=mem_available())



# --- memory limits and page sizes ----------------------------------------------------------


def meminfo() -> dict[str, int]:
    """/proc/meminfo as a dict; sizes in bytes, counts (HugePages_*) as they are."""
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            info[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return info


def cgroup_memory_headroom() -> int | None:
    """Bytes left under the tightest memory cgroup limit on this process's path (v1 or v2).

    Under Slurm the job's cgroup, not the node's MemAvailable, decides when pre-faulting the
    arena would invoke the OOM killer.
    """
    try:
        with open("/proc/self/cgroup") as f:
            entries = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        return None
    best = None
    for _, controllers, path in entries:
        if controllers == "":
            root, files = "/sys/fs/cgroup", ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):
            root = "/sys/fs/cgroup/memory"
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):
            directory = os.path.join(root, *parts[:depth])
            try:
                with open(os.path.join(directory, files[0])) as f:
                    limit = f.read().strip()
                with open(os.path.join(directory, files[1])) as f:
                    usage = int(f.read())
            except OSError:
                continue
            if limit.isdigit():
                left = int(limit) - usage
                best = left if best is None else min(best, left)
    return best


def available_memory(info: dict[str, int]) -> tuple[int, str]:
    """Bytes of ordinary memory an arena may take, and which limit that is."""
    headroom = cgroup_memory_headroom()
    if headroom is not None and headroom < info["MemAvailable"]:
        return max(headroom, 0), "left under the memory cgroup limit"
    return info["MemAvailable"], "MemAvailable"


def sysfs_choice(path: str) -> str:
    """The selected value of a sysfs choice file ('always [madvise] never' -> 'madvise')."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return "unavailable"
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if start >= 0 < end else text.strip()


def shmem_thp() -> tuple[bool, str]:
    """Whether MADV_HUGEPAGE can give this shmem mapping 2 MiB pages, and the setting read."""
    top = sysfs_choice(f"{THP}/shmem_enabled")
    per_size = sysfs_choice(f"{THP}/hugepages-2048kB/shmem_enabled")
    effective = top if per_size in ("inherit", "unavailable") else per_size
    setting = f"shmem_enabled={top}" + ("" if effective == top else f", 2048kB={per_size}")
    return effective in ("always", "within_size", "advise", "force"), setting


def online_nodes() -> list[int]:
    """NUMA nodes with memory, from sysfs ('0-1,3' -> [0, 1, 3]); [0] without NUMA."""
    try:
        with open("/sys/devices/system/node/has_memory") as f:
            text = f.read().strip()
    except OSError:
        return [0]
    nodes: list[int] = []
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        nodes.extend(range(int(lo), int(hi or lo) + 1))
    return nodes or [0]



def cgroup_version() -> str:
    if Path("/sys/fs/cgroup/cgroup.controllers").is_file():
        return "v2"
    if Path("/sys/fs/cgroup/cpuset").is_dir():
        hybrid = Path("/sys/fs/cgroup/unified/cgroup.controllers").is_file()
        return "v1 (hybrid, v2 at /sys/fs/cgroup/unified)" if hybrid else "v1"
    return "none found"


def hugepage_settings() -> dict[str, str]:
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("HugePages_Total", "HugePages_Free", "Hugepagesize"):
            out[key] = value.strip()
    for name in ("enabled", "shmem_enabled"):
        p = Path(THP) / name
        out[f"thp_{name}"] = p.read_text().strip() if p.is_file() else "absent"
    return out


def filesystem_of(path: str | os.PathLike[str], mounts: Path = Path("/proc/self/mounts")) -> str:
    """The file system type (``ext4``, ``nfs4``, ``lustre``, ...) of the mount that holds
    `path` (the longest mount point above it); "" when the mount table cannot be read."""
    target = Path(os.path.realpath(path))
    best, kind = -1, ""
    try:
        lines = mounts.read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        # the kernel escapes spaces, tabs, newlines and backslashes in octal
        where = Path(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1]))
        if (target == where or where in target.parents) and len(where.parts) >= best:
            best, kind = len(where.parts), fields[2]
    return kind
