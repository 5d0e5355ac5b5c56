"""Accepting a burst of connections in one turn of the event loop.

libuv, under uvloop, accepts one connection per readiness of the listening socket (its
"don't accept() connections in a loop", libuv#3696), so a queue of waiting connections
drains one per turn of the loop. A router that is busy turns its loop every few
milliseconds: 256 clients connecting at once (a fleet reconnecting, a load balancer
opening its pool) waited up to a second in the accept queue, while every request already
inside was answered in 50 ms (docs/performance.md). Here, each accepted connection
takes the rest of the queue with it, up to `BURST` (nginx's `multi_accept`), and each is
served exactly as one libuv accepted (`loop.connect_accepted_socket`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Iterable

from router.limits import descriptors_plentiful

log = logging.getLogger("router.accepting")

BURST = 512
"""Connections taken from the queue at most per accepted one; the next readiness (or the
next connection accepted) takes the rest. Bounds one loop turn's accept work."""

QUIET_SECONDS = 1.0
"""No bursts for this long once one reached half the descriptor table."""

ProtocolFactory = Callable[[], asyncio.Protocol]


class AcceptBurst:
    """The listening sockets of one server (duplicates of uvloop's descriptors, so that
    closing them here does not close the server's) and how to serve a connection."""

    def __init__(self, loop: asyncio.AbstractEventLoop, listening: Iterable[int],
                 factory: ProtocolFactory) -> None:
        self.loop = loop
        self._factory = factory
        self._listeners: list[socket.socket] = []
        for fileno in listening:
            listener = socket.socket(fileno=os.dup(fileno))
            listener.setblocking(False)
            self._listeners.append(listener)
        self._pending: set[asyncio.Task[object]] = set()
        self._quiet_until = 0.0

    def more(self) -> int:
        """Accept what is waiting now, up to `BURST`, and not past half the descriptors.
        A failure (no descriptor left, a connection reset while queued) ends the burst:
        libuv's own accept, at the next readiness, deals with it as it always does.
        Returns how many it took."""
        taken = 0
        if self._quiet_until and self.loop.time() < self._quiet_until:
            return taken
        for listener in self._listeners:
            for _ in range(BURST):
                try:
                    sock, _ = listener.accept()
                except OSError:  # BlockingIOError: nothing waits any more
                    break
                task = self.loop.create_task(self._serve(sock))
                self._pending.add(task)
                task.add_done_callback(self._pending.discard)
                taken += 1
                if not descriptors_plentiful(sock.fileno()):
                    # Half the descriptors are in use: no bursts for a while. Connections
                    # come one per turn, each with time to send its request before the
                    # next, and near the limit each closes idle clients first
                    # (`HttpProtocol._drain`). A burst accepted into the reserve had the
                    # drain close connections whose requests were not read yet, and end
                    # uploads whose request had not started, without an answer.
                    self._quiet_until = self.loop.time() + QUIET_SECONDS
                    return taken
        return taken

    async def _serve(self, sock: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(self._factory, sock)
        except OSError as exc:  # the client left in between: as if never accepted
            log.debug("an accepted connection failed before it was served: %r", exc)
            sock.close()

    def close(self) -> None:
        """No more bursts (the server stops accepting); connections already taken are
        served as any other."""
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            listener.close()
