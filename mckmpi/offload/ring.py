"""The asynchronous request ring between a rank and its proxy: its layout, shared by both ends.

McKernel's IKC queue in miniature. A rank (typically a scheduler task) submits "write these
arena bytes to fd at offset" and carries on computing; the proxy performs the write on a
Linux core straight from its mapping of the arena (no copy, no trap), and posts the result
in the same slot. Completion is *polled* -- `client.Channel.poll` is a scheduler poller that
reads one counter -- so the rank takes no interrupt and makes no system call to learn about
it. The rank's end is `client.Channel`, the proxy's `ring_server.ChannelServer`.

Ring (a memfd both sides map), 64-byte header then `slots` 64-byte slots:

    header: u64 head (rank: requests submitted)   u64 done (proxy: requests completed)
            u32 slots                            u32 magic
    slot:   u64 seq  u32 op  i32 fd  i64 offset  u64 arena_off  u64 length
            i64 result (>= 0, or -errno)  i64 start_ns  i64 done_ns

Each counter has a single writer and only grows; a slot is written completely before the
counter that publishes it, and x86-64 keeps stores (and loads) in program order, so a
reader that sees a counter sees the slot behind it. (This is why the table refuses other
architectures: Python cannot issue the fences a weaker memory model would need.)

Doorbell: an eventfd passed with SCM_RIGHTS. The rank writes it after each submission (one
native syscall on a low descriptor, never trapped); the proxy's channel thread sleeps in
read() on it. An eventfd rather than a futex because it needs no atomic instructions from
Python, it counts (several rings while the proxy is busy cost one wake-up), and it can be
passed over the socket. Skipping the ring when the proxy is awake would need a store-load
fence on both sides, which Python cannot emit; for checkpoint-sized writes one eventfd
write per request is noise. A second eventfd counts completions for a rank that wants to
block (`wait`) instead of polling.
"""

from __future__ import annotations

import struct

MAGIC = 0x4D434B31  # "MCK1"
HEADER = 64
SLOT = 64
OP_WRITE, OP_READ, OP_FSYNC = 1, 2, 3
#: one counter (head at 0, done at 8)
HEAD = struct.Struct("<Q")
#: the header: head, done, slots, magic
HDR = struct.Struct("<QQII")
#: a request: seq, op, fd, offset, arena_off, length
REQ = struct.Struct("<QIiqQQ")
#: a completion: result, start_ns, done_ns (at DONE_AT in the slot)
DONE = struct.Struct("<qqq")
DONE_AT = 40


def ring_size(slots: int) -> int:
    """Bytes of a ring of `slots` slots (header included)."""
    return HEADER + slots * SLOT
