"""`mckmpi proxy`: run a node proxy by hand (e.g. one task per node under srun)."""

from __future__ import annotations

import argparse

from mckmpi.frontend.registry import command


@command("proxy", "run a node's Linux-side syscall proxy (started by mckmpi run itself)",
         """The per-node proxy that executes the offloaded I/O system calls of its ranks
(McKernel's mcexec/delegator side). `mckmpi run` starts one per (virtual) node on the
node's Linux cores; run it by hand only to serve ranks that attach to --socket.

  mckmpi proxy --socket DIR/proxy.sock --cpus 0 --expect 4

Options after the command are the proxy's own (see `mckmpi proxy -- --help`).""")
def _build_proxy(p: argparse.ArgumentParser) -> None:
    p.add_argument("proxy_args", nargs=argparse.REMAINDER, help="the proxy's options")


@_build_proxy.run
def _cmd_proxy(args: argparse.Namespace) -> int:
    from mckmpi.offload.proxy import main

    rest = args.proxy_args[1:] if args.proxy_args[:1] == ["--"] else args.proxy_args
    return main(rest)
