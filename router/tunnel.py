"""Upgraded connections (WebSocket and any other HTTP/1.1 `Upgrade`): after the pod's 101,
the client's and the pod's connections are joined byte for byte (`Tunnel`), and every open
tunnel is known to one `Tunnels` registry (the per-client and total limits, the drain).

No frame is parsed: extensions, subprotocols, compression and close codes are the two
ends' business. Each direction has back-pressure: when one side's write buffer passes its
high-water mark, reading from the other side pauses until it drains, so memory stays flat
whatever the message sizes.

In a protocol other than WebSocket, an end that half-closes (a TCP FIN: it will send no
more) has that passed on to the other (`write_eof`), and the tunnel stays open for what the
other still sends (TCP's own semantics, and nginx's stream proxy with `proxy_half_close
on`; nginx's HTTP upgrades close both ends at either's FIN): a client that signals the end
of its input still gets the rest of the answer. WebSocket closes in its own frames and
has no half-close: there a FIN ends the tunnel, as a full close does (the router cannot
tell the two apart), so a client that just goes frees its pod's connection at once.

A tunnel ends when both ends have half-closed, when either end closes or fails (the other
is closed after what is buffered for it went out), when nothing passed either way for
`--upgrade-idle-timeout`, at `--upgrade-max-lifetime`, or at the end of the drain; those
three abort both ends, and still apply while an end is being closed (one that reads
nothing would otherwise hold the tunnel for ever). An end's TCP stack taking what the
router holds for it counts as traffic: a client that reads a large download steadily but
slowly is not cut while it reads, though no byte was read from either end for a while
(its pod paused behind it, or gone), nor is a slow reader of the last bytes a pod sent
before it closed. What the router holds includes the kernel's send queue (which on
loopback grows to megabytes: the router's own buffer can stay unchanged for seconds while
the client reads). A limit resets both connections: with no framing in a tunnel, a clean
end would pass a cut download off as a whole one.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

from router.errors import ProxyError
from router.sockets import reset, unsent

log = logging.getLogger("router.tunnel")

TOO_MANY_FROM_CLIENT = ProxyError(429, "Too many upgraded connections from this client.")
TOO_MANY_UPGRADES = ProxyError(503, "Too many upgraded connections.", ((b"retry-after", b"1"),))

IDLE_CHECKS = 4
"""Idle checks per `--upgrade-idle-timeout`: bytes an end took are seen at the next check
only, and dated at it, so an idle tunnel ends at most a quarter of the timeout late, and
never early."""


class _Side(asyncio.Protocol):
    """One end of a tunnel: what it reads goes to the other end's transport."""

    __slots__ = ("_tunnel", "peer", "received", "full")

    def __init__(self, tunnel: Tunnel, peer: asyncio.Transport) -> None:
        self._tunnel = tunnel
        self.peer = peer  # the other end's transport
        self.received = 0
        self.full = False  # this end's write buffer is past its high-water mark

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        self._tunnel.last_active = self._tunnel.loop.time()
        self.peer.write(data)

    def eof_received(self) -> bool:
        """True: this end's connection stays open for what the other end still sends
        (`Tunnel.half_closed`); False: it closes, and `connection_lost` ends the tunnel."""
        return self._tunnel.half_closed(self)

    def connection_lost(self, exc: Exception | None) -> None:
        tunnel = self._tunnel
        del self._tunnel  # the tunnel holds this side: no cycle left once both ends are gone
        tunnel.side_lost(self)

    def pause_writing(self) -> None:  # this end cannot take more: stop reading the other
        self.full = True
        if not self.peer.is_closing():
            self.peer.pause_reading()

    def resume_writing(self) -> None:
        self.full = False
        if not self.peer.is_closing():
            self.peer.resume_reading()


class Tunnel:
    """A client connection and a pod connection joined after a 101.

    States: open (both transports carry bytes), then closing (one end is gone or a limit
    was hit: the other end is being closed), then `done` once both transports reported
    their end. `bytes_in` counts what the client sent after its handshake's head,
    `bytes_out` what it was sent after the 101's. `client_early` and `pod_early` are what
    each end sent behind its head, read with it: they are the tunnel's first bytes."""

    def __init__(self, client: asyncio.Transport, client_early: bytes,
                 pod: asyncio.Transport, pod_early: bytes, head: bytes,
                 idle_timeout: float, max_lifetime: float, half_close: bool = True,
                 client_fin: bool = False) -> None:
        self.loop = asyncio.get_running_loop()
        self.last_active = self.loop.time()
        self.closing = False
        self.done: asyncio.Future[None] = self.loop.create_future()
        self._client, self._pod = client, pod
        self._from_client = _Side(self, pod)
        self._from_pod = _Side(self, client)
        self._from_client.received = len(client_early)
        self._from_pod.received = len(pod_early)
        self._open = 2
        self._half_close = half_close
        self._ended: set[_Side] = set()  # the ends that half-closed (a set: a second
        # report of the same end's FIN is not the other end's)
        self._idle_timeout = idle_timeout
        self._head = len(head)
        self._taken = 0  # what `_taken_now` was at the last idle check
        self._timers: list[asyncio.TimerHandle] = []
        if idle_timeout:
            self._timers.append(self.loop.call_later(idle_timeout / IDLE_CHECKS,
                                                     self._idle_check))
        if max_lifetime:
            self._timers.append(self.loop.call_later(max_lifetime, self.abort, "lifetime"))
        # The sides first, so that a first write past an end's high-water mark tells its
        # side (a transport says so once, when its buffer crosses the mark), which then
        # keeps the other end paused until it drains.
        client.set_protocol(self._from_client)
        pod.set_protocol(self._from_pod)
        client.write(head + pod_early if pod_early else head)
        if client_early:
            pod.write(client_early)
        if client_fin and not self.half_closed(self._from_client):  # before the 101
            client.close()
        # Each resumes reading unless its bytes' way is full (or it has nothing more to say).
        for source, way in ((client, self._from_pod), (pod, self._from_client)):
            if not source.is_closing() and not way.full and not (source is client and client_fin):
                source.resume_reading()

    @property
    def bytes_in(self) -> int:
        return self._from_client.received

    @property
    def bytes_out(self) -> int:
        return self._from_pod.received

    def half_closed(self, side: _Side) -> bool:
        """`side`'s end sent a FIN: send one to the other end, after what is buffered for
        it. Whether `side`'s connection stays open: not in a tunnel without half-close
        (WebSocket), not once both ends have half-closed (nothing can pass any more), nor
        when the tunnel is closing already."""
        self._ended.add(side)
        peer = side.peer
        if (not self._half_close or len(self._ended) > 1 or self.closing or peer.is_closing()
                or not peer.can_write_eof()):
            return False
        peer.write_eof()
        return True

    def side_lost(self, side: _Side) -> None:
        """One end is gone: close the other once what is buffered for it went out (the
        timers run on: an end that reads nothing is aborted by them)."""
        self._open -= 1
        if not self.closing:
            self.closing = True
            side.peer.close()
        if self._open <= 0 and not self.done.done():
            self._cancel_timers()
            self.done.set_result(None)

    def abort(self, why: str) -> None:
        """End both connections now (a limit, the drain): each end sees its connection
        reset, what the kernel still held for it dropped, with no close frame (the router
        does not speak WebSocket)."""
        if self.done.done():
            return
        log.info("closing an upgraded connection: %s", why)
        self.closing = True
        self._cancel_timers()
        reset(self._client)
        reset(self._pod)

    def _idle_check(self) -> None:
        now = self.loop.time()
        taken = self._taken_now()
        if taken > self._taken:  # an end took bytes since the last check
            self.last_active = now
        self._taken = taken
        quiet = now - self.last_active
        if quiet >= self._idle_timeout:
            self.abort("idle timeout")
        else:
            self._timers[0] = self.loop.call_later(
                min(self._idle_timeout - quiet, self._idle_timeout / IDLE_CHECKS),
                self._idle_check)

    def _taken_now(self) -> int:
        """What the two ends have taken of what the router wrote them: all it wrote, less
        what it still holds for them in its buffers and the kernel's send queues."""
        written = self._head + self._from_client.received + self._from_pod.received
        return written - sum(end.get_write_buffer_size() + unsent(end)
                             for end in (self._client, self._pod))

    def _cancel_timers(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers = []


class Tunnels:
    """Every open tunnel of this process, and the upgrade handshakes under way, counted per
    client (`router.clients.client_key`) for `--upgrade-max-per-client` and in all for
    `--upgrade-max`: once a connection is a tunnel, `--limit-concurrency` no longer counts
    it, and every pod has an address of its own, so without the total the clients
    together could hold every descriptor (two a tunnel). 0: no limit."""

    def __init__(self, max_per_client: int, max_total: int) -> None:
        self._max_per_client = max_per_client
        self._max_total = max_total
        self._per_client: Counter[str] = Counter()
        self._reserved = 0
        self._open: set[Tunnel] = set()
        self._empty: asyncio.Event | None = None

    def reserve(self, client: str) -> None:
        """Count one more upgraded connection for `client`, or raise why not: the client's
        own limit first (429: its doing), then the process's (503: the server's state,
        whoever asks); each reservation made is given back with `release`."""
        if self._max_per_client and self._per_client[client] >= self._max_per_client:
            raise TOO_MANY_FROM_CLIENT
        if self._max_total and self._reserved >= self._max_total:
            raise TOO_MANY_UPGRADES
        self._per_client[client] += 1
        self._reserved += 1

    def release(self, client: str) -> None:
        self._reserved -= 1
        self._per_client[client] -= 1
        if not self._per_client[client]:
            del self._per_client[client]

    def add(self, tunnel: Tunnel) -> None:
        self._open.add(tunnel)

    def remove(self, tunnel: Tunnel) -> None:
        self._open.discard(tunnel)
        if not self._open and self._empty is not None:
            self._empty.set()

    def __len__(self) -> int:
        return len(self._open)

    async def drain(self, seconds: float) -> None:
        """Wait up to `seconds` for the open tunnels to end by themselves, then abort the
        rest and wait for their owners to see them end."""
        if not self._open:
            return
        self._empty = asyncio.Event()
        log.info("waiting up to %g s for %d upgraded connections", seconds, len(self._open))
        try:
            await asyncio.wait_for(self._empty.wait(), max(seconds, 0))
        except TimeoutError:
            for tunnel in list(self._open):
                tunnel.abort("shutting down")
            await self._empty.wait()
