"""Clock offsets of every rank to rank 0, so timelines from different nodes line up.

Rank 0 plays ping-pong with each rank in turn and keeps, per rank, the exchange with the
smallest round trip: the remote clock is read half a round trip after rank 0's send, give
or take the asymmetry of that one exchange (bounded by its round-trip time, also recorded).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mpi4py import MPI

TAG = 0x6D636B  # 'mck'


def measure_offsets(comm: MPI.Intracomm, rounds: int = 8) -> tuple[int, int]:
    """(offset_ns, rtt_ns) of this rank: t_rank0 = t_local + offset_ns (0, 0 on rank 0)."""
    rank, size = comm.Get_rank(), comm.Get_size()
    clock = time.monotonic_ns
    if rank == 0:
        for peer in range(1, size):
            best = (1 << 62, 0)
            for _ in range(rounds):
                t0 = clock()
                comm.send(None, dest=peer, tag=TAG)
                remote = comm.recv(source=peer, tag=TAG)
                t1 = clock()
                if t1 - t0 < best[0]:
                    best = (t1 - t0, (t0 + t1) // 2 - remote)
            comm.send(best, dest=peer, tag=TAG)
        return 0, 0
    for _ in range(rounds):
        comm.recv(source=0, tag=TAG)
        comm.send(clock(), dest=0, tag=TAG)
    rtt, offset = comm.recv(source=0, tag=TAG)
    return offset, rtt
