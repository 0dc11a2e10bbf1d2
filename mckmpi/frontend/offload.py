"""`mckmpi proxy`: run a node proxy by hand (e.g. one task per node under srun)."""

from __future__ import annotations

import argparse

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
    from mckmpi.offload.proxy import add_arguments

    add_arguments(p)
    p.set_defaults(parser=p)


@_build_proxy.run
def _cmd_proxy(args: argparse.Namespace) -> int:
    from mckmpi.offload.proxy import run

    return run(args.parser, args)
