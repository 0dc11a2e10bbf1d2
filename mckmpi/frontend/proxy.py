"""`mckmpi proxy`: a node's offload proxy (spawned by `mckmpi run`, or started by hand)."""

from __future__ import annotations

import argparse
from pathlib import Path

from mckmpi.errors import UsageError
from mckmpi.frontend.registry import command


@command("proxy", "run a node's Linux-side syscall proxy (mckmpi run starts its own otherwise)",
         """The per-node proxy that executes the offloaded I/O system calls of its ranks
(McKernel's mcexec/delegator side). `mckmpi run` starts one per (virtual) node on the
node's Linux cores. Started by hand, e.g. one Slurm task per node, it serves the ranks
that name its socket with --offload-proxy, and exits once --expect ranks came and went:

  srun --ntasks-per-node=1 mckmpi proxy --socket /tmp/mckmpi-$SLURM_JOB_ID/proxy.sock \\
       --cpus 0 --expect 4 &
  srun --ntasks-per-node=4 mckmpi run --mode lwk \\
       --offload-proxy /tmp/mckmpi-$SLURM_JOB_ID/proxy.sock -- apps/checkpoint.py""")
def _build_proxy(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", required=True,
                   help="Unix socket path; its directory is created private (0700) when missing "
                        "and must be private otherwise")
    p.add_argument("--cpus", default="", help="CPUs to run on, e.g. 0,1 (the Linux cores)")
    p.add_argument("--expect", type=int, default=None,
                   help="ranks that will register; the proxy exits once they all left")
    p.add_argument("--parent-pid", type=int, default=None, help="exit with it if no rank is left")
    p.add_argument("--records-dir", default=None,
                   help="save the records of ranks that never detached here (.npy per rank)")
    p.add_argument("--idle-timeout", type=float, default=60.0,
                   help="exit when no rank is served for this many seconds before all "
                        "--expect ranks came [60]")
    p.add_argument("--remove-dir", action="store_true", help="remove the socket's directory at exit")
    p.add_argument("--spin-us", type=float, default=0.0,
                   help="poll this long for a rank's next call before sleeping [0]")
    p.add_argument("--interpreted", action="store_true",
                   help="serve every call in Python, without the compiled hot path "
                        "(to compare the two; slower)")


@_build_proxy.run
def _cmd_proxy(args: argparse.Namespace) -> int:
    from mckmpi.offload.server import serve
    from mckmpi.offload.spawn import prepare_run_dir

    cpus = _checked(args)
    created = prepare_run_dir(Path(args.socket).parent)  # private, created when missing
    return serve(args.socket, cpus=cpus,
                 expected=args.expect, parent_pid=args.parent_pid, records_dir=args.records_dir,
                 idle_timeout=args.idle_timeout, remove_dir=args.remove_dir or created,
                 spin_us=args.spin_us, compiled=not args.interpreted)


def _checked(args: argparse.Namespace) -> list[int] | None:
    """The proxy's options, checked before it creates anything; its CPUs as a list."""
    import math
    import os

    from mckmpi.utility.units import format_cpulist, parse_cpulist

    try:
        cpus = list(parse_cpulist(args.cpus)) if args.cpus.strip() else None
    except UsageError as exc:
        raise UsageError(f"--cpus: {exc}") from None
    allowed = os.sched_getaffinity(0)
    if cpus and not set(cpus) <= allowed:
        raise UsageError(f"--cpus {args.cpus}: CPU {min(set(cpus) - allowed)} is not among this "
                         f"process's CPUs {format_cpulist(sorted(allowed))}")
    if args.expect is not None and args.expect < 1:
        raise UsageError(f"--expect must be at least 1, got {args.expect}")
    if args.parent_pid is not None and args.parent_pid < 1:
        raise UsageError(f"--parent-pid must be a process id, got {args.parent_pid}")
    if not (math.isfinite(args.idle_timeout) and args.idle_timeout > 0):
        raise UsageError(f"--idle-timeout must be a positive number of seconds, "
                         f"got {args.idle_timeout:g}")
    if not (math.isfinite(args.spin_us) and args.spin_us >= 0):
        raise UsageError(f"--spin-us must be a number of microseconds from 0, got {args.spin_us:g}")
    return cpus
