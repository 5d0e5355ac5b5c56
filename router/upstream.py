"""The upstream hop: a lean HTTP/1.1 client on asyncio protocols and httptools, with a
keep-alive pool per pod, and its failures mapped to the router's errors here.

Why not a general-purpose client: measured in `bench/` on one core, uvicorn alone answers
about 50k requests/s, but with aiohttp's client as the upstream hop a bare proxy reaches
about 9k, and httpx far less (its pool serialises under concurrency, encode/httpx#3215).
A proxy needs a small part of what they do (no cookies, redirects, decompression, proxies
or TLS to pods), so this client does only that part: the request head and a small body go
out in one write, the response is parsed by the same C parser uvicorn uses, and the body is
handed over as it arrives, with back-pressure both ways (`router/connection.py`).

Failures: `ConnectFailed` when nothing was sent (the pool may try the next pod),
`UpstreamTimeout` when the pod went silent for the read timeout, `UpstreamFailed` for
everything after the request was written, pooled connection or not. When a request may be
sent again is `router/replay.py`'s rule: a pooled connection the pod has closed is found
before the write and replaced by another to the same pod; nothing is ever resent.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass

from router.config import Config
from router.connection import Body, Connection, Response, Unsent
from router.errors import ConnectFailed, TargetRefused
from router.logs import Repeated
from router.resolver import Lookup, Resolver, system_lookup

log = logging.getLogger("router.upstream")
# Any caller can name a refused address (a pinned sandbox's name, a hint): a line per
# request would be theirs to write (docs/security.md).
_REFUSED = Repeated(log, "refused to connect to %s (%s): address not allowed")

KEEPALIVE_SECONDS = 4.0
"""Below the 5 s idle timeout of uvicorn, node and most sandbox servers, so the router
drops a pooled connection before the pod does and rarely writes into a closing one."""

Permit = Callable[[str, str, int], bool]
"""Whether to connect to an address: (the host asked for, the IP literal it is or resolved
to, the port). `router.targets.TargetPolicy.permits` in the router."""


@dataclass(frozen=True, slots=True)
class Timeout:
    """`read` bounds every wait for the pod (its headers, then each body read), so a long
    stream that keeps moving is never cut; `connect` bounds one connection attempt."""

    read: float
    connect: float


class Client:
    """One per process: pooled keep-alive connections to every pod, no limit on their
    number (the pods' own capacity is what limits a pool). Made inside the event loop
    that uses it, which it keeps rather than look up on every request."""

    def __init__(self, lookup: Lookup = system_lookup, permit: Permit | None = None,
                 max_response_head: int = Config.max_response_head) -> None:
        self._loop = asyncio.get_running_loop()
        self._resolve = Resolver(lookup)
        self._permit = permit or _any_address
        self._max_head = max_response_head
        self._idle: dict[tuple[str, int], collections.deque[Connection]] = {}
        self._closed = False
        self._sweeper: asyncio.TimerHandle | None = None

    async def request(
        self, method: str, host: str, port: int, target: str,
        headers: list[tuple[str, str]], body: Body, limits: Timeout,
        length: int | None = None, upgrade: bool = False,
    ) -> Response:
        """Send the request; return once the answer's headers are in. `length` is the
        declared size of a streamed body (else it is sent chunked). A pooled connection
        found gone before the write is dropped for the next one (`replay.py`); a new one
        found gone is a failed connect. Bounded: each turn uses up a pooled connection.
        `upgrade`: the headers ask for one, so a 101 is a valid answer (`router/tunnel.py`)."""
        head = _head(method, target, _authority(host, port), headers, body, length)
        while True:
            connection = (self._pooled(host, port)
                          or await self._connect(host, port, limits.connect))
            try:
                return await connection.send(method, head, body, length, limits.read,
                                             self._max_head, upgrade)
            except Unsent:
                if not connection.reused:
                    raise ConnectFailed() from None

    def _pooled(self, host: str, port: int) -> Connection | None:
        """An idle connection to the pod, if one is fit for use (no coroutine: most
        requests take one)."""
        idle = self._idle.get((host, port))
        if idle:
            now = self._loop.time()
            while idle:
                # The longest idle first: under steady load every pooled connection keeps
                # being used, so none reaches the keep-alive limit and is reopened.
                connection = idle.popleft()
                if not connection.closed and now - connection.idle_since < KEEPALIVE_SECONDS:
                    connection.reused = True
                    return connection
                connection.close()
        return None

    async def _connect(self, host: str, port: int, connect_timeout: float) -> Connection:
        """A timeout scope rather than `wait_for`, whose task per connect held each refusal
        in a reference cycle (the task, its exception, the traceback, the frame holding the
        task). The refusal's own traceback is dropped for the same reason (uvloop's frame
        keeps the exceptions it collected); the error itself stays as the cause, for the log."""
        try:
            async with asyncio.timeout(connect_timeout):
                return await self._open(host, port)
        except (OSError, TimeoutError) as exc:
            raise ConnectFailed() from exc.with_traceback(None)

    async def _open(self, host: str, port: int) -> Connection:
        """Look the name up (unless it is an address), ask the address policy, and connect:
        all within the connect timeout. The one place every connection is decided, so a
        header, a cached pod and a DNS answer cannot take different paths around it."""
        address = host if _is_ip(host) else await self._resolve(host)
        if not self._permit(host, address, port):
            _REFUSED.warning(host, address)
            raise TargetRefused()
        made: list[Connection] = []  # the protocol, if the connect got that far

        def factory() -> Connection:
            made.append(Connection(self, (host, port), self._loop))
            return made[0]

        try:
            await self._loop.create_connection(factory, address, port)
        except BaseException:
            if made:  # cancelled after `connection_made`: see `Connection.discard`
                made[0].discard()
            raise
        return made[0]

    def keep(self, connection: Connection) -> None:
        if self._closed:  # an answer dropped after shutdown began (`Response.abandon`)
            connection.close()
            return
        connection.idle_since = self._loop.time()
        idle = self._idle.get(connection.key)
        if idle is None:
            idle = self._idle[connection.key] = collections.deque()
        idle.append(connection)
        if self._sweeper is None:
            self._sweeper = self._loop.call_later(KEEPALIVE_SECONDS, self._sweep)

    def forget(self, connection: Connection) -> None:
        idle = self._idle.get(connection.key)
        if idle and connection in idle:
            idle.remove(connection)

    def _sweep(self) -> None:
        """Close connections idle past the keep-alive limit, so pods that get no more
        requests (gone, or pinned sandboxes whose session ended) are not held open."""
        self._sweeper = None
        limit = self._loop.time() - KEEPALIVE_SECONDS
        for key, idle in list(self._idle.items()):
            while idle and idle[0].idle_since <= limit:  # oldest first: the deque's order
                idle.popleft().close()
            if not idle:
                del self._idle[key]
        if self._idle:
            self._sweeper = self._loop.call_later(KEEPALIVE_SECONDS, self._sweep)

    async def close(self) -> None:
        self._closed = True
        self._resolve.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                connection.close()


def _head(method: str, target: str, authority: str, headers: list[tuple[str, str]],
          body: Body, length: int | None) -> bytes:
    lines = [f"{method} {target} HTTP/1.1\r\nhost: {authority}\r\n"]
    for name, value in headers:  # a loop: a generator here cost a resumption per header
        lines.append(f"{name}: {value}\r\n")
    if isinstance(body, bytes):
        lines.append(f"content-length: {len(body)}\r\n")
    elif body is not None:
        lines.append("transfer-encoding: chunked\r\n" if length is None
                     else f"content-length: {length}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("latin-1")


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _any_address(host: str, address: str, port: int) -> bool:
    """No policy: a bare client (tests of the client itself) connects where it is told."""
    return True


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
