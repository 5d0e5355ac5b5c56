"""The upstream hop: a lean HTTP/1.1 client on asyncio protocols and httptools, with a
keep-alive pool per pod, and its failures mapped to the router's errors here.

Why not a general-purpose client: measured in `bench/` on one core, uvicorn alone answers
about 50k requests/s, but with aiohttp's client as the upstream hop a bare proxy reaches
about 9k, and httpx far less (its pool serialises under concurrency, encode/httpx#3215).
A proxy needs a small part of what they do (no cookies, redirects, decompression, proxies
or TLS to pods), so this client does only that part: the request head and a small body go
out in one write, the response is parsed by the same C parser uvicorn uses, and the body is
handed over as it arrives, with back-pressure both ways.

Failures: `ConnectFailed` when nothing was sent (the pool may try the next pod),
`UpstreamTimeout` when the pod went silent for the read timeout, `UpstreamFailed` for
everything after the request was sent. A pooled connection that the pod closed while it
was idle is detected (closed before a single byte of answer) and, for idempotent methods
with a replayable body, the request is sent once more on a new connection.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import httptools
from cachetools import TTLCache

from router.body import ClientGone
from router.errors import ConnectFailed, ProxyError, UpstreamFailed, UpstreamTimeout

KEEPALIVE_SECONDS = 4.0
"""Below the 5 s idle timeout of uvicorn, node and most sandbox servers, so the router
drops a pooled connection before the pod does and rarely writes into a closing one."""

DNS_CACHE_SECONDS = 10.0
HIGH_WATER = 512 * 1024
"""Response bytes buffered before reading from the pod pauses (the client is slower)."""
LOW_WATER = 128 * 1024
JOIN_LIMIT = 64 * 1024
"""Small pieces that gathered are joined into one message; larger ones pass uncopied."""
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})

Body = bytes | AsyncIterator[bytes] | None
Resolver = Callable[[str], Awaitable[str]]
"""A host name to one IP address; raises OSError when there is none."""


@dataclass(frozen=True, slots=True)
class Timeout:
    """`read` bounds every wait for the pod (its headers, then each body read), so a long
    stream that keeps moving is never cut; `connect` bounds one connection attempt."""

    read: float
    connect: float


class _Stale(Exception):
    """A reused connection closed before any answer: the pod dropped it while idle."""


class Client:
    """One per process: pooled keep-alive connections to every pod, no limit on their
    number (the pods' own capacity is what limits a pool)."""

    def __init__(self, resolve: Resolver | None = None) -> None:
        self._resolve = resolve or _system_resolver()
        self._idle: dict[tuple[str, int], collections.deque[Connection]] = {}
        self._sweeper: asyncio.TimerHandle | None = None

    async def request(
        self, method: str, host: str, port: int, target: str,
        headers: list[tuple[str, str]], body: Body, limits: Timeout,
        length: int | None = None,
    ) -> Response:
        """Send the request; return once the answer's headers are in. `length` is the
        declared size of a streamed body (else it is sent chunked)."""
        head = _head(method, target, _authority(host, port), headers, body, length)
        connection = await self._acquire(host, port, limits.connect)
        try:
            return await connection.send(method, head, body, length, limits.read)
        except _Stale:
            if method not in IDEMPOTENT or not (body is None or isinstance(body, bytes)):
                raise UpstreamFailed() from None
        connection = await self._connect(host, port, limits.connect)
        try:
            return await connection.send(method, head, body, length, limits.read)
        except _Stale:
            raise UpstreamFailed() from None

    async def _acquire(self, host: str, port: int, connect_timeout: float) -> Connection:
        idle = self._idle.get((host, port))
        if idle:
            now = asyncio.get_running_loop().time()
            while idle:
                # The longest idle first: under steady load every pooled connection keeps
                # being used, so none reaches the keep-alive limit and is reopened.
                connection = idle.popleft()
                if not connection.closed and now - connection.idle_since < KEEPALIVE_SECONDS:
                    connection.reused = True
                    return connection
                connection.close()
        return await self._connect(host, port, connect_timeout)

    async def _connect(self, host: str, port: int, connect_timeout: float) -> Connection:
        try:
            return await asyncio.wait_for(self._open(host, port), connect_timeout)
        except (OSError, TimeoutError) as exc:
            raise ConnectFailed() from exc

    async def _open(self, host: str, port: int) -> Connection:
        """Look the name up (unless it is an address) and connect: both within the
        connect timeout."""
        address = host if _is_ip(host) else await self._resolve(host)
        _, connection = await asyncio.get_running_loop().create_connection(
            lambda: Connection(self, (host, port)), address, port
        )
        return connection

    def keep(self, connection: Connection) -> None:
        loop = asyncio.get_running_loop()
        connection.idle_since = loop.time()
        idle = self._idle.get(connection.key)
        if idle is None:
            idle = self._idle[connection.key] = collections.deque()
        idle.append(connection)
        if self._sweeper is None:
            self._sweeper = loop.call_later(KEEPALIVE_SECONDS, self._sweep)

    def forget(self, connection: Connection) -> None:
        idle = self._idle.get(connection.key)
        if idle and connection in idle:
            idle.remove(connection)

    def _sweep(self) -> None:
        """Close connections idle past the keep-alive limit, so pods that get no more
        requests (gone, or pinned sandboxes whose session ended) are not held open."""
        self._sweeper = None
        loop = asyncio.get_running_loop()
        limit = loop.time() - KEEPALIVE_SECONDS
        for key, idle in list(self._idle.items()):
            while idle and idle[0].idle_since <= limit:  # oldest first: the deque's order
                idle.popleft().close()
            if not idle:
                del self._idle[key]
        if self._idle:
            self._sweeper = loop.call_later(KEEPALIVE_SECONDS, self._sweep)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                connection.close()


class Connection(asyncio.Protocol):
    """One TCP connection to a pod; carries one request at a time."""

    def __init__(self, client: Client, key: tuple[str, int]) -> None:
        self.key = key
        self.reused = False
        self.closed = False
        self.idle_since = 0.0
        self.response: Response | None = None
        self._client = client
        self._transport: asyncio.Transport | None = None
        self._write_paused = False
        self._drained: asyncio.Future[None] | None = None
        self._aborted = False

    async def send(
        self, method: str, head: bytes, body: Body, length: int | None, read_timeout: float
    ) -> Response:
        assert self._transport is not None
        response = Response(self, method, read_timeout)
        self.response = response
        if body is None:
            self._transport.write(head)
        elif isinstance(body, bytes):
            self._transport.write(head + body)  # one write: one segment for small requests
        else:
            self._transport.write(head)
            response.body_sent = False
            response.writer = asyncio.ensure_future(self._stream(body, length, response))
        try:
            await response.wait_headers()
        except BaseException:
            response.close()
            raise
        return response

    async def _stream(self, body: AsyncIterator[bytes], length: int | None,
                      response: Response) -> None:
        """Send a streamed body; chunked unless the client declared its length."""
        try:
            async for chunk in body:
                if self.closed:
                    return
                if chunk:
                    if length is None:
                        self._write(b"%x\r\n" % len(chunk), chunk, b"\r\n")
                    else:
                        self._write(chunk)
                    await self._drain()
            if length is None and not self.closed:
                self._write(b"0\r\n\r\n")
            response.body_sent = True
        except ClientGone as exc:
            response.fail(exc)
            self.close()
        except (OSError, ProxyError):
            self.close()

    def _write(self, *parts: bytes) -> None:
        assert self._transport is not None
        self._transport.writelines(parts)

    async def _drain(self) -> None:
        if self._write_paused and not self.closed:
            self._drained = asyncio.get_running_loop().create_future()
            await self._drained

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._aborted = True
            if self._transport is not None:
                self._transport.abort()

    def release(self) -> None:
        """Back to the pool if the exchange ended cleanly, else closed."""
        response, self.response = self.response, None
        if response is not None and response.reusable and not self.closed:
            self._client.keep(self)
        else:
            self.close()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self.response is not None:
            self.response.feed(data)
        else:
            self.close()  # bytes nobody asked for: this connection cannot be trusted

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._client.forget(self)
        if self.response is not None:
            # Our own abort ends the connection without an error, but never cleanly.
            self.response.lost(exc or (ConnectionAbortedError() if self._aborted else None))
        self.resume_writing()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._drained = None

    def pause_reading(self) -> None:
        if self._transport is not None and not self.closed:
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._transport is not None and not self.closed:
            self._transport.resume_reading()


class Response:
    """A pod's answer: status and raw headers once `send` returns, then the body as it
    arrives (`chunks()`), buffered up to `HIGH_WATER` before reading from the pod pauses."""

    def __init__(self, connection: Connection, method: str, read_timeout: float) -> None:
        self.status = 0
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.content_length: int | None = None
        self.writer: asyncio.Future[None] | None = None
        self.body_sent = True
        self._connection = connection
        self._parser = httptools.HttpResponseParser(self)
        self._no_body = method == "HEAD"
        self._read_timeout = read_timeout
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self._headers_done = False
        self._complete = False
        self._keep_alive = False
        self._keep_alive_header = False
        self._tainted = False  # the pod sent bytes beyond its answer: never reuse
        self._received = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._released = False
        self._remaining: int | None = None

    @property
    def reusable(self) -> bool:
        return (self._complete and self._keep_alive and self.body_sent and not self._chunks
                and not self._tainted)

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._complete:
            self._tainted = True  # a second answer nobody asked for: ignored
            return
        self.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self._complete:
            self._tainted = True
            return
        status = self._parser.get_status_code()
        if status < 200:  # 1xx: informational, the real answer follows
            self.raw_headers = []
            return
        self.status = status
        self._headers_done = True
        self._keep_alive_header = self._parser.should_keep_alive()
        for name, value in self.raw_headers:
            if name.lower() == b"content-length" and value.isdigit():
                self.content_length = int(value)
        if self._no_body or status in (204, 304):
            self._finish()
        elif self.content_length is not None and not self._until_close():
            self._remaining = self.content_length  # framing is plain: `feed` skips the parser
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self._complete:  # e.g. a body after the head of a HEAD answer
            self._tainted = True
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._remaining is not None:
            self._remaining -= len(body)
        if self._buffered > HIGH_WATER and not self._paused:
            self._paused = True
            self._connection.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._headers_done and not self._complete:
            self._finish()
            self._wake()

    def _finish(self) -> None:
        self._complete = True
        self._keep_alive = self._keep_alive_header
        self._remaining = None

    # From the connection

    def feed(self, data: bytes) -> None:
        self._received = True
        if self._complete:
            self._tainted = True  # bytes after the end (a HEAD answer with a body)
            return
        if self._remaining is not None:
            # A body of known length past the head: handed on as received, without the
            # parser's copy of every chunk (what bounds a large download's speed).
            if len(data) > self._remaining:
                self._tainted = True
                data = data[: self._remaining]
            self.on_body(data)
            if not self._remaining:
                self.on_message_complete()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self.fail(UpstreamFailed("The backend sandbox sent an invalid HTTP response."))
            self._connection.close()

    def lost(self, error: Exception | None) -> None:
        if self._complete:
            return
        if self._headers_done and self._until_close() and error is None:
            self._complete = True  # delimited by a clean end of the connection (not a reset)
            self._wake()
        elif not self._received and self._connection.reused:
            self.fail(_Stale())
        else:
            self.fail(UpstreamFailed())

    def _until_close(self) -> bool:
        return self.content_length is None and not any(
            name.lower() == b"transfer-encoding" for name, _ in self.raw_headers
        )

    def fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._wake()

    # For the proxy

    async def wait_headers(self) -> None:
        while not self._headers_done:
            if self._error is not None:
                raise self._error
            await self._wait()

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, each read joining what has gathered."""
        chunks = self._chunks
        while True:
            if chunks:
                if len(chunks) == 1 or self._buffered > JOIN_LIMIT:
                    data = chunks.popleft()  # large reads pass on as they are, uncopied
                    self._buffered -= len(data)
                else:
                    data = b"".join(chunks)
                    chunks.clear()
                    self._buffered = 0
                if self._paused and self._buffered <= LOW_WATER:
                    self._paused = False
                    self._connection.resume_reading()
                yield data
            elif self._complete:
                return
            elif self._error is not None:
                raise self._error
            else:
                await self._wait()

    def whole(self) -> bytes | None:
        """The entire body if it has all arrived already (small answers usually come in
        the same read as their headers), else None: then use `chunks()`."""
        if not self._complete:
            return None
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        if self._paused:
            self._paused = False
            self._connection.resume_reading()
        return data

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    def release(self) -> None:
        """Done with the answer: its connection goes back to the pool if it ended cleanly."""
        if self._released:
            return
        self._released = True
        if self.writer is not None and not self.writer.done():
            self.writer.cancel()
            self.body_sent = False
        self._connection.release()

    def close(self) -> None:
        """Abandon the answer (the client left): its connection is closed, never pooled."""
        if not self._released:
            self._connection.close()
            self.fail(UpstreamFailed("The answer was abandoned."))

    async def _wait(self) -> None:
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(self._read_timeout, self._timed_out, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def _timed_out(self, waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            self._error = UpstreamTimeout()
            waiter.set_exception(self._error)
            self._connection.close()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def _head(method: str, target: str, authority: str, headers: list[tuple[str, str]],
          body: Body, length: int | None) -> bytes:
    lines = [f"{method} {target} HTTP/1.1\r\nhost: {authority}\r\n"]
    lines.extend(f"{name}: {value}\r\n" for name, value in headers)
    if isinstance(body, bytes):
        lines.append(f"content-length: {len(body)}\r\n")
    elif body is not None:
        lines.append("transfer-encoding: chunked\r\n" if length is None
                     else f"content-length: {length}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("latin-1")


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _system_resolver() -> Resolver:
    """The system's lookups, each name cached for `DNS_CACHE_SECONDS` (pinned sandboxes by
    DNS name get many requests in a row)."""
    cache: TTLCache[str, str] = TTLCache(maxsize=4096, ttl=DNS_CACHE_SECONDS)

    async def resolve(host: str) -> str:
        address = cache.get(host)
        if address is None:
            infos: list[Any] = await asyncio.get_running_loop().getaddrinfo(
                host, None, type=socket.SOCK_STREAM
            )
            address = cache[host] = str(infos[0][4][0])
        return address

    return resolve
