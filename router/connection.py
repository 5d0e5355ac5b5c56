"""One keep-alive connection to a pod (`Connection`, an asyncio protocol) and the answer
it carries (`Response`): the request goes out in as few writes as possible, the answer is
parsed by httptools, and its body is handed over as it arrives, with back-pressure both
ways. The pool itself is `router/upstream.py`'s; which failures may be retried is
`router/replay.py`'s.

What a pod may send is bounded and checked: the answer head (interim 1xx heads included)
up to `max_head` bytes, a status in 100-599 (101 only in answer to an upgrade request the
router sent: see `router/tunnel.py`), and no transfer coding but `chunked`; anything else
is a 502 at once and the connection is closed.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from typing import Protocol, cast

import httptools

from router import replay
from router.body import ClientGone
from router.errors import ProxyError, UpstreamFailed, UpstreamTimeout
from router.limits import MAX_HEADERS, Deadline
from router.sockets import bound_send_buffer

HIGH_WATER = 512 * 1024
"""Response bytes buffered before reading from the pod pauses (the client is slower)."""
LOW_WATER = 128 * 1024
MAX_PIECES = 1024
"""Pieces of body buffered before reading pauses, whatever their size: a pod sending
1-byte chunks to a client that reads slowly made each stalled request hold 512 Ki
objects (about 20 MB), not 512 KiB."""
JOIN_LIMIT = 64 * 1024
"""Small pieces that gathered are joined into one message; larger ones pass uncopied."""
DRAIN_LIMIT = 64 * 1024
"""An unwanted answer up to this size is read and dropped to keep its connection."""
LEAVE_GRACE = 0.1
"""Seconds an answer nobody waits for any more may take to arrive whole (`abandon`)."""

Body = bytes | AsyncIterator[bytes] | None


INVALID = "The backend sandbox sent an invalid HTTP response."
TOO_BIG = "The backend sandbox sent too large a header."
STATUS_LINE = len("HTTP/1.1 200 \r\n")
"""What a status line adds to the head besides its reason phrase."""


class Unsent(Exception):
    """Nothing of the request was written: the connection was gone before the first byte."""


class Pool(Protocol):
    """Where a connection goes back when its exchange ended cleanly."""

    def keep(self, connection: Connection) -> None: ...

    def forget(self, connection: Connection) -> None: ...


class Connection(asyncio.Protocol):
    """One TCP connection to a pod; carries one request at a time."""

    def __init__(self, pool: Pool, key: tuple[str, int],
                 loop: asyncio.AbstractEventLoop) -> None:
        self.key = key
        self.loop = loop
        self.reused = False
        self.closed = False
        self.idle_since = 0.0
        self.response: Response | None = None
        self._pool = pool
        self._transport: asyncio.Transport | None = None
        self._write_paused = False
        self._drained: asyncio.Future[None] | None = None
        self._aborted = False
        self.reading: Deadline | None = None  # bounds each wait for the pod, once connected

    async def send(
        self, method: str, head: bytes, body: Body, length: int | None, read_timeout: float,
        max_head: int, upgrade: bool = False,
    ) -> Response:
        """Write the request and wait for the answer's head. Raises `Unsent` when the
        connection is found gone first (a pooled one the pod closed: `replay.py`)."""
        transport = self._transport
        assert transport is not None
        if self.closed or (
            replay.closed_by_pod(transport, self._watched) if self.reused
            else transport.is_closing()
        ):
            self.close()
            raise Unsent
        transport.write(head + body if isinstance(body, bytes) else head)  # one segment
        if transport.is_closing():
            # The write itself failed (asyncio and uvloop close the transport when the send
            # system call fails, which then wrote nothing): a reset not yet reported.
            self.close()
            raise Unsent
        response = Response(self, method, read_timeout, max_head, upgrade)
        self.response = response
        if body is not None and not isinstance(body, bytes):
            response.body_sent = False
            response.writer = asyncio.ensure_future(self._stream(body, length, response))
        try:
            while (waiting := response.head_wait()) is not None:
                await waiting
        except asyncio.CancelledError:
            response.abandon()  # the client left (or the router is stopping)
            raise
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
                    response.progress()  # the pod takes the body: it is not silent
                del chunk  # not held while the next piece is awaited (it may be minutes)
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
            self._drained = self.loop.create_future()
            await self._drained

    def discard(self) -> None:
        """`loop.create_connection` gave up on this connection after `connection_made`
        (the request was cancelled in between: its client left, or the connect timeout):
        uvloop then closes the transport without `connection_lost`, so let go here of what
        that would have (the deadline's callback and the transport both hold this
        connection: two reference cycles, freed only by the collector)."""
        self.closed = True
        if self.reading is not None:
            self.reading.close()
        transport, self._transport = self._transport, None
        if transport is not None and not transport.is_closing():
            transport.abort()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._aborted = True
            if self._transport is not None:
                self._transport.abort()

    def detach(self) -> asyncio.Transport:
        """Give the connection up to a tunnel after a 101: never pooled, never closed
        here. Raises `UpstreamFailed` if the pod has closed it already."""
        if self.closed or self._transport is None or self._transport.is_closing():
            self.close()
            raise UpstreamFailed()
        self.closed = True
        self.response = None
        if self.reading is not None:  # the tunnel's protocol gets its end, not this one:
            self.reading.close()  # its timer's callback would hold this connection in a cycle
        return self._transport

    def release(self, keep: bool = True) -> None:
        """Back to the pool if the exchange ended cleanly (and `keep`), else closed."""
        response, self.response = self.response, None
        if keep and response is not None and response.reusable and not self.closed:
            self._pool.keep(self)
        else:
            self.close()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._watched = replay.watch(transport.get_extra_info("socket").fileno())
        bound_send_buffer(transport)
        self.reading = Deadline(self.loop, self._read_expired)

    def _read_expired(self) -> None:
        if self.response is not None:
            self.response.timed_out()

    def data_received(self, data: bytes) -> None:
        if self.response is not None:
            self.response.feed(data)
        else:
            self.close()  # bytes nobody asked for: this connection cannot be trusted

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool.forget(self)
        if self.reading is not None:
            self.reading.close()
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
    arrives (`chunks()`), buffered up to `HIGH_WATER` before reading from the pod pauses.
    Slotted: one per request in flight, and at high concurrency what each request touches
    is what costs (cache misses, #13). Its pieces are in a deque, not a list: they are
    taken from the front one at a time past `JOIN_LIMIT`, and a list's `pop(0)` moves all
    the others each time (a pod's 4-byte chunks, some 29,000 to a read, doubled the
    router's time per byte)."""

    __slots__ = ("status", "raw_headers", "content_length", "writer", "body_sent",
                 "_connection", "_parser", "_no_body", "_read_timeout", "_max_head",
                 "_head_size", "_head_left", "_framing", "_chunks", "_buffered", "_paused",
                 "_headers_done", "_chunked", "_complete", "_keep_alive", "_tainted", "_error",
                 "_waiter", "_released", "_remaining", "_settling", "_upgrade", "_early",
                 "__weakref__")

    def __init__(self, connection: Connection, method: str, read_timeout: float,
                 max_head: int, upgrade: bool = False) -> None:
        self.status = 0
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.content_length: int | None = None
        self.writer: asyncio.Future[None] | None = None
        self.body_sent = True
        self._connection = connection
        self._parser = httptools.HttpResponseParser(self)
        self._no_body = method == "HEAD"
        self._read_timeout = read_timeout
        self._max_head = max_head
        self._head_size = 0  # the heads as parsed (1xx included): lines and their CRLFs
        self._head_left = max_head  # raw bytes fed before the head ended (`feed`)
        self._framing = 0  # raw bytes fed since the last piece of body: trailers, chunk lines
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self._headers_done = False
        self._chunked = False
        self._complete = False
        self._keep_alive = False  # as the pod said; counts only once the answer is complete
        self._tainted = False  # the pod sent bytes beyond its answer: never reuse
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._released = False
        self._remaining: int | None = None
        self._settling: asyncio.Future[None] | None = None
        self._upgrade = upgrade  # the request asked for an upgrade: a 101 is an answer
        self._early = b""  # bytes the pod sent right after its 101 head

    @property
    def reusable(self) -> bool:
        return (self._complete and self._keep_alive and self.body_sent and not self._chunks
                and not self._tainted)

    # httptools callbacks; one raising `UpstreamFailed` stops the parser (`feed`)

    def on_status(self, reason: bytes) -> None:
        if not self._complete:
            self._grow(len(reason))  # called once per piece of a reason split across reads

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._complete:
            self._tainted = True  # a second answer nobody asked for: ignored
            return
        # `_grow`, inlined: this runs for every header of every answer.
        self._head_size += len(name) + len(value) + 4  # ": " and CRLF
        if self._head_size > self._max_head:
            raise UpstreamFailed(TOO_BIG)
        if not self._headers_done:  # a trailer is not merged into the head (RFC 9110 6.5.1)
            if len(self.raw_headers) >= MAX_HEADERS:
                # 64 KiB of empty header lines would hold 1.5 MB of tuples per answer.
                raise UpstreamFailed(TOO_BIG)
            self.raw_headers.append((name.lower(), value))  # once: see router/headers.py

    def _grow(self, size: int) -> None:
        self._head_size += size
        if self._head_size > self._max_head:
            raise UpstreamFailed(TOO_BIG)

    def on_headers_complete(self) -> None:
        if self._complete:
            self._tainted = True
            return
        self._grow(STATUS_LINE + 2)  # and the empty line that ends the head
        status = self._parser.get_status_code()
        if not 100 <= status <= 599 or (status == 101 and not self._upgrade):
            raise UpstreamFailed(INVALID)  # a 101 nobody asked for: see the docstring
        if status == 101:  # the rest of the connection is the tunnel's (`detach`)
            self.status = status
            self._headers_done = self._complete = self._tainted = True
            self._wake()
            return
        if status < 200:  # 1xx: informational, the real answer follows
            self.raw_headers = []
            return
        codings: list[bytes] = []
        for name, value in self.raw_headers:
            if name == b"content-length":
                value = value.rstrip(b" \t")  # httptools keeps trailing OWS
                if value.isdigit():
                    self.content_length = int(value)
            elif name == b"transfer-encoding":
                codings.extend(coding.strip().lower() for coding in value.split(b","))
        bodiless = self._no_body or status in (204, 304)
        if codings and codings != [b"chunked"] and not bodiless:
            # Only `chunked` alone, which the parser removes: another coding could not be
            # passed on under the router's own framing, and reading to the end (RFC 9112
            # 6.3) would hand the client coded bytes as plain. nginx refuses these too
            # ("upstream sent unknown Transfer-Encoding").
            raise UpstreamFailed(INVALID)
        self._chunked = bool(codings)
        self.status = status
        self._headers_done = True
        self._keep_alive = self._parser.should_keep_alive()
        if bodiless:
            self._finish()
        elif self.content_length is not None and not self._until_close():
            self._remaining = self.content_length  # framing is plain: `feed` skips the parser
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self._complete:  # e.g. a body after the head of a HEAD answer
            self._tainted = True
            return
        self._framing = 0
        self._chunks.append(body)
        self._buffered += len(body)
        if self._remaining is not None:
            self._remaining -= len(body)
        if (self._buffered > HIGH_WATER or len(self._chunks) > MAX_PIECES) and not self._paused:
            self._paused = True
            self._connection.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._headers_done and not self._complete:
            self._finish()
            self._wake()

    def _finish(self) -> None:
        self._complete = True
        self._remaining = None

    # From the connection

    def feed(self, data: bytes) -> None:
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
        if not self._headers_done:
            # Bounds what the parser buffers of a header line not yet complete (a 128 MiB
            # header is refused after `max_head` plus one read); `_grow` counts exactly.
            self._head_left -= len(data)
        else:  # the same for a trailer line, or anything else that is not body
            self._framing += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:  # after a 101: the parser stops there
            self._early = data[exc.args[0]:]
        except httptools.HttpParserError as exc:
            refused = exc.__context__  # what a callback raised, if one did
            self._refuse(refused if isinstance(refused, UpstreamFailed)
                         else UpstreamFailed(INVALID))
            return
        if (self._head_left < 0 and not self._headers_done) or self._framing > self._max_head:
            self._refuse(UpstreamFailed(TOO_BIG))

    def _refuse(self, error: UpstreamFailed) -> None:
        self.fail(error)
        self._connection.close()

    def lost(self, error: Exception | None) -> None:
        if self._complete:
            return
        if self._headers_done and self._until_close() and error is None:
            self._complete = True  # delimited by a clean end of the connection (not a reset)
            self._wake()
        else:
            self.fail(UpstreamFailed())  # final, pooled connection or not: `replay.py`

    def _until_close(self) -> bool:
        return self.content_length is None and not self._chunked

    def fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._wake()

    # For the proxy

    def head_wait(self) -> asyncio.Future[None] | None:
        """None once the answer's head is in; raises what failed it; else what to await
        before asking again. Not a coroutine: each one a request waits through is one more
        object touched when the pod answers (#13)."""
        if self._headers_done:
            return None
        if self._error is not None:
            raise self._error
        return self._wait()

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
                if self._paused and self._buffered <= LOW_WATER and len(chunks) <= MAX_PIECES:
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

    def detach(self) -> tuple[asyncio.Transport, bytes]:
        """After a 101: the pod's connection, and what the pod sent after the 101 head."""
        assert self.status == 101
        try:
            return self._connection.detach(), self._early
        finally:
            self._let_go()

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    def release(self) -> None:
        """Done with the answer: its connection goes back to the pool if it ended cleanly."""
        self._end(keep=True)

    def close(self) -> None:
        """Give up on the answer: its connection is closed, never pooled."""
        self._end(keep=False)

    def _end(self, keep: bool) -> None:
        if self._released:
            return
        writer, self.writer = self.writer, None  # its cancellation would hold this answer
        if writer is not None and not writer.done():
            writer.cancel()
            self.body_sent = False
        self._connection.release(keep)  # which lets go of this answer
        self._let_go()

    def _let_go(self) -> None:
        """Nothing feeds or reads the answer any more: let go of what would hold it in a
        reference cycle, which only the cyclic collector would free (under load a
        collection every few dozen requests, each costing more the more requests are in
        flight, #13; on failure paths a pod connection held until then). The parser holds
        this answer (its callbacks are bound methods) and the answer the parser; an error
        raised from here holds, through its traceback, the frames whose `self` this is."""
        self._released = True
        del self._parser
        self._error = None

    def abandon(self) -> None:
        """Nobody waits for this answer any more (the client left, or it is a busy answer
        the next pod replaces), and the request is at the pod. Closing at once would cost
        a new connection for the next request whenever clients give up on quick answers
        (a load generator stopping, a burst of client timeouts) or pods are busy. So the
        answer gets `LEAVE_GRACE` to arrive whole, if it is not declared or found to be
        larger than `DRAIN_LIMIT`, and is dropped with the connection kept; otherwise the
        connection is closed, so that a slow pod (one trickling its 503 included) stops
        working for nobody and holds no request. Nothing else of the request goes on here:
        no retry, no answer to the client."""
        if self._released or self._settling is not None:
            return
        if not self.body_sent:  # a streamed body still going out: nothing to wait for
            self.close()
            return
        if self._complete:  # already whole (a busy answer usually is): kept at once
            self.whole()
            self.release()
            return
        self._settling = asyncio.ensure_future(self._settle())

    async def _settle(self) -> None:
        whole = False
        try:
            async with asyncio.timeout(LEAVE_GRACE):
                while not self._complete:
                    if self._error is not None or self._too_big_to_wait_for():
                        return
                    await self._wait()
            whole = True
        except (TimeoutError, ProxyError):
            pass
        finally:
            if whole:
                self.whole()  # dropped
                self.release()
            else:
                self.close()

    def _too_big_to_wait_for(self) -> bool:
        return self._buffered > DRAIN_LIMIT or (self.content_length or 0) > DRAIN_LIMIT

    def _wait(self) -> asyncio.Future[None]:
        """What resolves when the pod sends more (`_wake`), for at most the read timeout:
        timed by the connection's `Deadline`, which moves without a new timer per wait and
        stops when the wait ends. A wait given up (cancelled) leaves it running: it then
        finds nothing to wake (`timed_out`), or the next wait moves it."""
        connection = self._connection
        waiter = self._waiter = connection.loop.create_future()
        reading = connection.reading
        assert reading is not None  # a response exists only on a connected connection
        reading.start(self._read_timeout)
        return waiter

    def progress(self) -> None:
        """The pod took another piece of a streamed body before it answered: the wait for
        its answer begins again, so an upload longer than the read timeout is no 504 (nginx
        starts its read timeout once the request is sent). A pod that stops taking the
        body blocks the writes, and then times out."""
        reading = self._connection.reading
        if not self._headers_done and reading is not None:
            reading.start(self._read_timeout)

    def timed_out(self) -> None:
        """The wait ran out: the waiter is woken, not failed, and finds the error (an
        exception set on the waiter would hold, through its traceback, the frame holding
        the waiter: a reference cycle)."""
        if self._waiter is not None and not self._waiter.done():
            self.fail(UpstreamTimeout())
            self._connection.close()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            self._connection.reading.stop()  # type: ignore[union-attr]  # connected
            if not waiter.done():
                waiter.set_result(None)
