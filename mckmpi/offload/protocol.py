"""Control messages between a rank and its node's proxy.

A SOCK_SEQPACKET Unix socket keeps message boundaries, so each message is one JSON object
with its descriptors (SCM_RIGHTS) attached to the same datagram. The conversation:

    rank -> proxy  hello    {rank, fd_base, policy, arena: [address, size] | null}
    proxy -> rank  {ok, pid} | {ok: false, error}        (peer credentials checked first)
    rank           installs its filter
    rank -> proxy  register [listener fd, arena memfd?]
    proxy -> rank  {ok} | {ok: false, error}
    rank -> proxy  channel {slots} [ring memfd, doorbell eventfd, completion eventfd]
    rank -> proxy  detach   -> {ok, count} [memfd holding the packed records]
    rank -> proxy  records  -> {ok, count} [memfd]: the same, the session staying attached

Bulk data never travels over the socket (records go in a memfd), so a message stays small.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

VERSION = 1
MAX_MESSAGE = 65536
MAX_FDS = 4


class ProtocolError(RuntimeError):
    """The other side sent something that is not a protocol message (or hung up)."""


def send(sock: socket.socket, msg: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> None:
    data = json.dumps(msg, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"message too large ({len(data)} bytes)")
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.sendall(data)


def recv(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """One message and the descriptors that came with it; ProtocolError on EOF/garbage."""
    data, fds, flags, _ = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
    problem = None
    if not data:
        problem = "connection closed"
    elif flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        problem = "message or descriptors truncated"
    else:
        try:
            msg = json.loads(data)
        except ValueError as e:
            problem = f"malformed message: {e}"
        else:
            if not isinstance(msg, dict):
                problem = "malformed message: not an object"
    if problem:
        for fd in fds:
            os.close(fd)
        raise ProtocolError(problem)
    return msg, fds


def listening_socket(path: str) -> socket.socket:
    """A bound, listening SEQPACKET socket at `path` (created atomically by rename)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        sock.bind(tmp)
        os.chmod(tmp, 0o600)
        sock.listen(64)
        os.rename(tmp, path)
    except BaseException:
        sock.close()
        raise
    return sock


def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return sock
