"""Facts about the node: versions, MPI, parallel HDF5, kernel features, limits.

`mckmpi info` prints these (what a user runs first on a new cluster) and every run file
stores the version part as provenance, so both come from here.
"""

from __future__ import annotations

import os
import platform
import resource
import sys
from pathlib import Path
from typing import Any

import numpy as np

import mckmpi
from mckmpi.node.host import NodeFacts, cgroup_version, hugepage_settings, read_host
from mckmpi.utility.units import format_cpulist


def versions(mpi: bool = True) -> dict[str, str]:
    """Versions of everything that shapes a measurement (with `mpi`, imports MPI: call after
    init; without, the MPI library is not asked, for a process that must not initialise it)."""
    import h5py
    import mpi4py

    library = standard = ""
    if mpi:
        from mpi4py import MPI

        library = MPI.Get_library_version().strip("\x00 \n").splitlines()[0]
        standard = "{}.{}".format(*MPI.Get_version())
    return {
        "mckmpi": mckmpi.__version__,
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "numpy": np.__version__,
        "mpi4py": mpi4py.__version__,
        "mpi_library": library,
        "mpi_standard": standard,
        "h5py": h5py.version.version,
        "hdf5": h5py.version.hdf5_version,
        "h5py_mpi": str(bool(h5py.get_config().mpi)),
        "kernel": platform.release(),
        "machine": platform.machine(),
    }


def limits() -> dict[str, str]:
    def fmt(v: int) -> str:
        return "unlimited" if v == resource.RLIM_INFINITY else str(v)

    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    nsoft, nhard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {
        "memlock": f"{fmt(soft)} (hard {fmt(hard)})",
        "nofile": f"{fmt(nsoft)} (hard {fmt(nhard)})",
        "nr_open": Path("/proc/sys/fs/nr_open").read_text().strip(),
        "uid": str(os.getuid()),
        "sched_rt_runtime_us": Path("/proc/sys/kernel/sched_rt_runtime_us").read_text().strip(),
    }


def seccomp() -> dict[str, Any]:
    """What the kernel offers for syscall offload (user notification, ADDFD), found by
    installing a filter in a forked child."""
    from mckmpi.offload.seccomp import probe

    actions = Path("/proc/sys/kernel/seccomp/actions_avail")
    found = probe()
    found["actions_avail"] = actions.read_text().strip() if actions.is_file() else "none"
    return found


def gather() -> dict[str, dict[str, Any]]:
    """Everything `mckmpi info` shows, by section."""
    from mckmpi.utility.units import format_size

    host = read_host()
    return {
        "versions": versions(),
        "node": {
            "hostname": platform.node(),
            "cpus (cpuset)": format_cpulist(host.cpus),
            "cpus (this process)": format_cpulist(os.sched_getaffinity(0)),
            "numa nodes": ", ".join(f"{n}: {format_cpulist(c)}" for n, c in host.numa.items()) or "1",
            "memory available": format_size(host.mem_available),
            "cgroup": cgroup_version(),
            "python": sys.executable,
        },
        "hugepages": hugepage_settings(),
        "limits": limits(),
        "seccomp": seccomp(),
        "isolation": isolation_facts(host),
    }


def isolation_facts(host: NodeFacts) -> dict[str, str]:
    """How far this host can take the LWK cores of its default plan away from Linux."""
    from mckmpi.node import isolation
    from mckmpi.node.cpuset import default_state_dir
    from mckmpi.node.partition import plan_node

    if len(host.cpus) < 2:
        return {"isolation": "one CPU: no LWK core to isolate"}
    plan = plan_node(host, 1, mode="lwk", oversubscribe=True)
    return {"lwk cpus (default plan)": format_cpulist(plan.lwk_cpus),
            **isolation.facts(plan.linux_cpus, plan.lwk_cpus, state_dir=default_state_dir())}
