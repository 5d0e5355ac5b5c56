"""The kernel's side of a connection, which a transport does not show: the bytes that wait
in its socket to be read (`unread`), those written but not yet taken by the peer
(`unsent`), and closing it with a reset (`reset`). The reads are Linux `ioctl`s (FIONREAD,
TIOCOUTQ) and read 0 on a closed transport (uvloop's closed socket has descriptor -1: a
ValueError) or where they fail.

Timers use them to tell a connection that only looks idle from the router's side from one
that is: uvloop runs a turn's timers before its reads, so a request that came during a
long turn waits unread when its connection's keep-alive fires (router/protocol.py); and a
client slowly taking a download that the kernel's send queue holds is not idle, though
nothing passes through the router's own buffers (router/tunnel.py)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import socket
import struct
import termios

_INT = struct.Struct("i")
_LINGER_0 = struct.pack("ii", 1, 0)
_CLOSED = (AttributeError, OSError, ValueError)
"""No socket, a closed one (uvloop's: descriptor -1), or a call the platform refuses."""


def _queued(transport: asyncio.BaseTransport, request: int) -> int:
    sock = transport.get_extra_info("socket")
    try:
        count: int = _INT.unpack(fcntl.ioctl(sock.fileno(), request, bytes(_INT.size)))[0]
    except _CLOSED:
        return 0
    return count


def unread(transport: asyncio.BaseTransport) -> int:
    """Bytes waiting in the socket to be read."""
    return _queued(transport, termios.FIONREAD)


def unsent(transport: asyncio.BaseTransport) -> int:
    """Bytes written to the socket that the peer has not taken yet (its send queue)."""
    return _queued(transport, termios.TIOCOUTQ)


POD_SEND_BUFFER = 256 * 1024
"""Bytes of kernel send buffer on a pod connection (Linux doubles it for its own
bookkeeping). Autotuned, it grew to megabytes wherever a pod stopped reading an upload
(3.9 MB after one small exchange on loopback, `net.ipv4.tcp_wmem`), charged to the
router's memory cgroup (cgroup v2) as its RSS is (`python -m bench.held`). A pod is in
the cluster, a fraction of a millisecond away: this keeps a gigabyte a second in flight
to it. HAProxy's `tune.sndbuf.server`. The receive side stays autotuned: a pod that
writes a large answer and closes leaves what the router has not taken in an orphaned
socket, which the kernel resets under memory pressure or a window shut too long, cutting
the answer a slow client was still reading."""


def bound_send_buffer(transport: asyncio.BaseTransport) -> None:
    """Fix a pod connection's kernel send buffer at `POD_SEND_BUFFER`."""
    with contextlib.suppress(*_CLOSED):
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                                                      POD_SEND_BUFFER)


def reset(transport: asyncio.Transport) -> None:
    """Close `transport` with a TCP reset (SO_LINGER 0): the kernel drops what it still
    held to send, and the peer learns its connection was cut, not ended (a tunnel, which
    has no framing to show a cut: router/tunnel.py)."""
    with contextlib.suppress(*_CLOSED):
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                      _LINGER_0)
    transport.abort()
