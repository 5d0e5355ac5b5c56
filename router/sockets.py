"""What the kernel holds for a connection, read without reading it: the bytes that wait in
its socket to be read (`unread`) and those written but not yet taken by the peer
(`unsent`). Both are Linux `ioctl`s (FIONREAD, TIOCOUTQ) and read 0 on a closed
transport (uvloop's closed socket has descriptor -1: a ValueError) or where they fail.

Timers use them to tell a connection that only looks idle from the router's side from one
that is: uvloop runs a turn's timers before its reads, so a request that came during a
long turn waits unread when its connection's keep-alive fires (router/protocol.py); and a
client slowly taking a download that the kernel's send queue holds is not idle, though
nothing passes through the router's own buffers (router/tunnel.py)."""

from __future__ import annotations

import asyncio
import fcntl
import struct
import termios

_INT = struct.Struct("i")


def _queued(transport: asyncio.BaseTransport, request: int) -> int:
    sock = transport.get_extra_info("socket")
    try:
        count: int = _INT.unpack(fcntl.ioctl(sock.fileno(), request, bytes(_INT.size)))[0]
    except (AttributeError, OSError, ValueError):
        return 0
    return count


def unread(transport: asyncio.BaseTransport) -> int:
    """Bytes waiting in the socket to be read."""
    return _queued(transport, termios.FIONREAD)


def unsent(transport: asyncio.BaseTransport) -> int:
    """Bytes written to the socket that the peer has not taken yet (its send queue)."""
    return _queued(transport, termios.TIOCOUTQ)
