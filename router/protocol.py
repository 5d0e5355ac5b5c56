"""The client side of the HTTP/1.1 hop: uvicorn's httptools protocol, extended with what
a proxy in front of untrusted clients needs. Each request's answer is written by a
`router.cycle.ProxyCycle` (a small answer in one write); each connection is in a named
reading state with one deadline (`--header-timeout`, `--body-timeout`), bounded in head
size as bytes arrive (`--max-request-head`), in body size (`--max-body-size`), and in how
long its writes may stay unread (`--send-timeout`); it tells the request it serves when
the client leaves (`ClientWatch`), closes under a body still arriving without losing its
answer to a reset (`linger`), and hands itself over to a tunnel after an upgrade
(`ClientUpgrade`).
The limits' mechanics are `router/limits.py`'s; `router/server.py` runs servers with it."""
from __future__ import annotations

import asyncio
import enum
import logging
import math
import urllib.parse
from collections.abc import Callable
from typing import Any, ClassVar, cast

import httptools
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT, FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from router.accepting import AcceptBurst
from router.asgi import Receive, Scope, Send
from router.config import Config
from router.cycle import MessageEvent, ProxyCycle
from router.errors import ProxyError, send_error
from router.headers import websocket_only
from router.limits import (
    LINGER,
    LINGER_LIMIT,
    MAX_HEADERS,
    Deadline,
    connections_to_drain,
    nothing,
    refusal,
    too_large,
)
from router.logs import Repeated
from router.sockets import unread

log = logging.getLogger("router.protocol")


DISCONNECT = "router.disconnect"
"""The scope extension through which a request learns that its client has gone."""


class ClientWatch:
    """One per client connection: the request's handle on it. While a request is served,
    `task` is its task: if the client connection is lost, it is cancelled at once, whatever
    it waits for (the pod's first byte included), so the pod is not left working for nobody
    (`Response.abandon` says what becomes of its connection); `gone` tells the request why
    it was cancelled, and `expired` what to answer when a limit cancelled it."""

    __slots__ = ("task", "gone", "expired", "_protocol")

    def __init__(self, protocol: HttpProtocol) -> None:
        self.task: asyncio.Task[Any] | None = None
        self.gone = False
        self.expired: ProxyError | None = None
        self._protocol: HttpProtocol | None = protocol

    def lost(self) -> None:
        if self.task is not None:
            self.gone = True
            self.task.cancel()
            self.task = None

    def expire(self, error: ProxyError) -> None:
        """End the request with `error` (the client was too slow, or its body malformed):
        cancelled wherever it waits, a pod connection it holds is closed, so no pod gets a
        silently short body. A request whose task has not run yet (the error came in the
        read that began it) meets the error as it starts (`router.proxy`)."""
        self.expired = error
        if self.task is not None:
            self.task.cancel()
            self.task = None

    def release(self) -> None:
        """At connection close: the protocol and its watch no longer hold each other, so
        both are freed then, not at the next full garbage collection."""
        self._protocol = None

    def cut(self) -> None:
        """End the connection under an answer that cannot be finished (the pod failed
        mid-body): what is buffered still goes out, then the client sees the connection
        end short of the declared length or the last chunk, the only signal left once the
        head is out. The request counts as disconnected, so uvicorn does not also log the
        app as broken for returning early."""
        if self._protocol is not None:
            self._protocol.cut()


class Reading(enum.Enum):
    """Where a client connection is in reading requests."""

    IDLE = "idle"  # between requests: nothing of the next one has come
    HEAD = "head"  # a request head has begun and is not complete
    BODY = "body"  # the head is complete, the body is not
    CLOSING = "closing"  # answered, write side shut: what comes is dropped (`linger`)


MAX_PIPELINED = 16
"""Requests parsed and queued behind the one being answered. The parser takes a whole read
(up to 256 KiB) at once, so without a bound one read of tiny pipelined requests became
thousands of queued ones, each with its cycle, scope and headers: about 8 MB a read, and
seconds of parsing. Above it the connection closes (an answer is in flight)."""
HEAD_TIMEOUT = "The request head did not arrive in time."
BODY_TIMEOUT = ProxyError(408, "The request body did not arrive in time.")
TRAILERS_TOO_LARGE = ProxyError(431, "The request trailers are too large.")
BODY_TOO_LARGE = ProxyError(413, "The request body is too large.", ((b"connection", b"close"),))
"""`--max-body-size`: answered before the body is read when its `Content-Length` is above
(`router.proxy`), else once the bytes received pass it (`HttpProtocol.on_body`)."""
BAD_REQUEST = "Invalid HTTP request received."
BAD_BODY = ProxyError(400, BAD_REQUEST)
OVER_LIMIT = ProxyError(503, "The router is at its concurrency limit.",
                        ((b"retry-after", b"1"), (b"connection", b"close")))
# uvicorn's two warnings a client causes at will, on uvicorn's logger as before.
_BAD_REQUESTS = Repeated(logging.getLogger("uvicorn.error"), BAD_REQUEST)
_OVER_LIMIT = Repeated(logging.getLogger("uvicorn.error"), "Exceeded concurrency limit.")


async def _over_limit(scope: Scope, receive: Receive, send: Send) -> None:
    """Above `--limit-concurrency`: uvicorn's `service_unavailable` answers in plain text,
    and every status of the router's own is JSON."""
    await send_error(send, OVER_LIMIT)


class HeadRefused(Exception):
    """Raised from a parser callback to stop parsing a head that will be refused."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class ReadingFlow(FlowControl):
    """uvicorn's flow control, telling the protocol when reading resumes: time the router
    spent not reading a body (its buffer full, the pod slow) is not the client's."""

    def __init__(self, transport: asyncio.Transport, resumed: Callable[[], None]) -> None:
        super().__init__(transport)
        self.resumed = resumed

    def resume_reading(self) -> None:
        if self.read_paused:
            super().resume_reading()
            self.resumed()


UPGRADE = "router.upgrade"
"""The scope extension of a request that asks for an upgrade: a `ClientUpgrade`."""


EARLY_LIMIT = HIGH_WATER_LIMIT
"""Bytes a client may send behind its handshake before the 101, kept for the tunnel: past
them, reading pauses, or for WebSocket, whose client must wait for the 101 before it sends
(RFC 6455 4.1), the connection closes (a paused connection's FIN would go unseen)."""


class ClientUpgrade:
    """The handle on a client connection whose request asks for an upgrade (`Connection:
    upgrade` plus `Upgrade`, as the parser saw them). The parser stops at the end of that
    head, so the connection carries no other request: whatever the answer, it closes after
    it, unless the pod's 101 turns it into a tunnel (`take`). `early`: what the client
    sends after the head (the head declared no body: router/proxy.py refuses one), the
    tunnel's first bytes if there is one. Reading goes on meanwhile, into `early`, so a
    client that leaves during the handshake is seen to: its request ends (499), and its
    pod connection and upgrade slots are freed, not held until `--proxy-timeout` (reading
    paused, its FIN went unseen). A FIN is leaving when the client asks for WebSocket
    alone, which has no half-close; in another protocol it is a half-close (`fin`), passed
    on once the tunnel is up."""

    __slots__ = ("_protocol", "early", "websocket", "fin")

    def __init__(self, protocol: HttpProtocol, early: bytes, websocket: bool) -> None:
        self._protocol = protocol
        self.early = bytearray(early)
        self.websocket = websocket
        self.fin = False

    def hold(self, data: bytes) -> None:
        self.early += data
        if len(self.early) > EARLY_LIMIT:
            transport = self._protocol.transport
            if self.websocket:
                transport.close()  # its request ends as the client's leaving does (499)
            else:
                transport.pause_reading()  # the tunnel resumes it

    def take(self) -> tuple[asyncio.Transport, bytes, bool]:
        """The client's transport, for `router.tunnel.Tunnel` (see `become_tunnel`),
        `early` and `fin`. `early` is emptied: the request holds this handle for the
        tunnel's whole life."""
        early, self.early = bytes(self.early), bytearray()
        return self._protocol.become_tunnel(), early, self.fin


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, its answers written by `ProxyCycle`, telling the
    request it serves when the client goes away (the `router.disconnect` scope extension), and
    bounding what a client can make it hold (`--max-request-head`, `--header-timeout`,
    `--body-timeout`, `--send-timeout`, idle clients closed when descriptors run short).
    It relies on uvicorn's internals (`cycle.body`, `_start_asgi_task`, the parser
    callbacks): hence the pinned version."""

    options: ClassVar[Config] = Config()
    """The limits; `server_config` gives each server a subclass with its own."""
    burst: ClassVar[AcceptBurst | None] = None
    """Its server's accept queue, once it listens (`router.server.AcceptingServer`)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.watch = ClientWatch(self)
        self._handshake: ClientUpgrade | None = None  # the parser stopped at its head
        self._extensions = {DISCONNECT: self.watch}  # the same for every request on it
        self.serving: RequestResponseCycle | None = None
        self.reading = Reading.IDLE
        self.opened = self.loop.time()
        self._head_bytes = 0  # read since the current head began (whole reads: an upper bound)
        self._line_open = True  # no line end seen yet in the current head
        self._exact = False  # the head began inside a read: `_head_bytes` missed part of it
        self._framing = 0  # read in a body since its last piece: trailers, chunk lines
        self._body_bytes = 0  # of the body being read (`--max-body-size`)
        self._lingered = 0  # dropped since the answer, while closing (`linger`)
        self._extended = False  # the head timer was re-armed for unread bytes (`_expired`)
        self._deadline = Deadline(self.loop, self._expired)
        self._keep_alive = Deadline(self.loop, self.timeout_keep_alive_handler)
        self._send_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self.flow = ReadingFlow(self.transport, self._reading_resumed)
        self._deadline.start(self.options.header_timeout)
        sock = transport.get_extra_info("socket")
        drain = connections_to_drain(sock.fileno()) if sock is not None else 0
        if drain:
            self._drain(drain)
        elif self.burst is not None:  # not while descriptors run short: one at a time then
            self.burst.more()

    def data_received(self, data: bytes) -> None:
        """uvicorn's, with the head counted as it arrives: a head above
        `--max-request-head` is refused before it is all buffered (httptools keeps a
        header value whole until it ends)."""
        if self.reading is Reading.CLOSING:
            self._lingered += len(data)
            if self._lingered > LINGER_LIMIT:
                self.transport.close()
            return
        if self._handshake is not None:
            self._handshake.hold(data)
            return
        if self.reading is not Reading.BODY:
            self._head_bytes += len(data)
            if self._line_open and b"\n" in data:
                self._line_open = False
        else:  # bounded like a head: httptools keeps a trailer value whole until it ends
            self._framing += len(data)
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            refused = exc.__context__
            if refused is not None:  # kept by the parser: its frames would hold this protocol
                refused.with_traceback(None)
            if isinstance(refused, HeadRefused):
                self._refuse(refused.status, refused.detail)
            elif isinstance(refused, ProxyError):  # from `on_body`: the body is too large
                self._refuse_body(refused)
            else:
                self._bad_request()
            return
        except httptools.HttpParserError:
            self._bad_request()
            return
        except httptools.HttpParserUpgrade as upgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning(data[upgrade.args[0]:])
            return
        reading = self.reading
        if reading is Reading.BODY:
            if self._framing > self.options.max_request_head:
                self._refuse_body(TRAILERS_TOO_LARGE)
            elif not self.flow.read_paused:
                self._deadline.start(self.options.body_timeout)
        elif reading is Reading.IDLE:
            self._exact = False  # the read ended with a request: the next one is counted whole
        elif reading is Reading.HEAD:
            if len(self.headers) > MAX_HEADERS:
                self._refuse(431, "Too many request headers.")
            elif self._head_bytes > self.options.max_request_head:
                if self._line_open:
                    self._refuse(414, "The request line is too long.")
                else:
                    self._refuse(431, "The request headers are too large.")

    def eof_received(self) -> bool | None:  # type: ignore[override]
        """The client sent a FIN: the connection closes, as in uvicorn, unless a handshake
        is under way in a protocol that can half-close (`ClientUpgrade`)."""
        handshake = self._handshake
        if handshake is None or handshake.websocket:
            return None
        handshake.fin = True
        return True

    def _bad_request(self) -> None:
        """uvicorn's 400 went out at once, even behind a pipelined request in flight: the
        client took it for that request's answer. `_refuse` keeps the order (and answers
        in JSON, as every status of the router's own). In a body (a bad chunk line), the
        request has begun: it answers the 400 itself, and closes its pod connection, so
        the pod never takes what came for a whole request."""
        _BAD_REQUESTS.warning()
        if self.reading is Reading.BODY:
            self._refuse_body(BAD_BODY)
        else:
            self._refuse(400, BAD_REQUEST)

    def on_message_begin(self) -> None:
        HttpToolsProtocol.on_message_begin(self)  # not super(): an object per request
        self.reading = Reading.HEAD
        self.scope["extensions"] = self._extensions  # type: ignore[typeddict-item]

    def on_headers_complete(self) -> None:
        if (self._exact or self._head_bytes > self.options.max_request_head
                or len(self.headers) > MAX_HEADERS):
            self._check_head()  # the head came in large reads, or after another: count exactly
        self._framing = 0
        self._body_bytes = 0
        self._exact = False
        self._head_bytes = 0
        self._line_open = True
        self._deadline.stop()
        self._start_cycle()
        self.reading = Reading.BODY  # once its request exists: else an error is the head's
        # The request's scope holds the list of its head; a chunked body's trailers, which
        # uvicorn's `on_header` appends too, go to a list nobody reads: never merged into
        # the headers (RFC 9110 6.5.1), else one in the head's read would route the request.
        self.headers = []

    def _start_cycle(self) -> None:
        """uvicorn's `on_headers_complete`, step for step, with a `ProxyCycle`
        (router/cycle.py) for the request: uvicorn names its own cycle class inside that
        method. Turning a made cycle into a `ProxyCycle` instead (assigning `__class__`)
        cost more than it saved: every attribute read of the object then missed the
        interpreter's per-class caches."""
        parser = self.parser
        scope = self.scope
        http_version = parser.get_http_version()
        scope["method"] = parser.get_method().decode("ascii")
        if http_version != "1.1":
            if http_version != "1.0":  # the parser takes 2.0, and 0.9 (no version at all)
                raise HeadRefused(505, "The HTTP version is not supported.")
            scope["http_version"] = http_version
        if parser.should_upgrade() and self._should_upgrade():
            return
        url = httptools.parse_url(self.url)
        raw_path = url.path or b"/"  # absolute form with no path: "/" (RFC 9112 3.2.1)
        path = raw_path.decode("ascii")
        if "%" in path:
            path = urllib.parse.unquote(path)
        scope["path"] = self.root_path + path
        scope["raw_path"] = self.root_path.encode("ascii") + raw_path
        scope["query_string"] = url.query or b""
        app = self.app
        limit = self.limit_concurrency
        if limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit):
            app = _over_limit
            _OVER_LIMIT.warning()
        existing = self.cycle
        self.cycle = ProxyCycle(
            scope=scope,
            transport=self.transport,
            flow=self.flow,
            logger=self.logger,
            access_logger=self.access_logger,
            access_log=self.access_log,
            default_headers=self.server_state.default_headers,
            message_event=MessageEvent(),  # type: ignore[arg-type]
            expect_100_continue=self.expect_100_continue,
            keep_alive=http_version != "1.0" and parser.should_keep_alive(),
            on_response=self.on_response_complete,
        )
        if existing is None or existing.response_complete:
            self._start_asgi_task(self.cycle, app)
        else:  # pipelined: waits for the answer before it
            if len(self.pipeline) >= MAX_PIPELINED:
                raise HeadRefused(429, "Too many pipelined requests.")  # in flight: closes
            self.flow.pause_reading()
            self.pipeline.appendleft((self.cycle, app))

    def _check_head(self) -> None:
        limit = self.options.max_request_head
        line = len(self.parser.get_method()) + len(self.url) + len(" HTTP/1.1\r\n") + 1
        if line > limit:
            raise HeadRefused(414, "The request line is too long.")
        if len(self.headers) > MAX_HEADERS:
            raise HeadRefused(431, "Too many request headers.")
        if line + sum(len(name) + len(value) + 4 for name, value in self.headers) + 2 > limit:
            raise HeadRefused(431, "The request headers are too large.")

    def on_message_complete(self) -> None:
        HttpToolsProtocol.on_message_complete(self)
        self.reading = Reading.IDLE
        self._exact = True  # if the next head begins in this read (pipelined)
        self._deadline.stop()

    def on_response_complete(self) -> None:
        """uvicorn's, with its keep-alive timer (a new timer per request, cancelled by the
        next request's first read) kept in a `Deadline` that moves without one; then, with
        no request left in flight, the next head is timed."""
        self.server_state.total_requests += 1
        self._extended = False
        if self.reading is Reading.CLOSING:
            return  # nothing more is read, run or timed on it (`linger`)
        if not self.transport.is_closing():
            self.flow.resume_reading()  # a handshake's bytes go to its `early`, unparsed
            if self.pipeline:
                cycle, app = self.pipeline.pop()
                self._start_asgi_task(cycle, app)
            else:
                self._keep_alive.start(self.timeout_keep_alive)
        serving = self.serving
        if self.reading is not Reading.BODY and (serving is None or serving.response_complete):
            self._deadline.start(self.options.header_timeout)

    def _unset_keepalive_if_required(self) -> None:
        self._keep_alive.stop()

    def timeout_keep_alive_handler(self) -> None:
        """uvicorn's (the idle connection closes), unless the next request already waits
        unread in its socket: uvloop runs a turn's timers before its reads, so a request
        that came during a long turn would be closed under (`router.sockets`). The head
        deadline, running since the last answer, still bounds it."""
        if not unread(self.transport):
            super().timeout_keep_alive_handler()

    def _in_flight(self) -> bool:
        return self.serving is not None and not self.serving.response_complete

    def _reading_resumed(self) -> None:
        if self.reading is Reading.BODY:
            self._deadline.start(self.options.body_timeout)

    def _expired(self) -> None:
        """The current wait ran out: a head (408, or a quiet close if nothing of a next
        request came), or a body (see `_body_expired`)."""
        if self.transport.is_closing():
            return
        if self.reading is Reading.CLOSING:
            self.transport.close()  # `LINGER` ran out
        elif self.reading is Reading.BODY:
            if not self.flow.read_paused:  # else the router is the one not reading
                self._body_expired()
        elif not self._in_flight():
            if self.reading is Reading.HEAD:
                self._refuse(408, HEAD_TIMEOUT)
            elif not (self._extended or self.flow.read_paused) and unread(self.transport):
                # A next request came during a long turn (`timeout_keep_alive_handler`):
                # it is read in this turn, and its head timed from now. Once per answer:
                # bytes that begin no request (a blank line) would otherwise extend it
                # at every long turn.
                self._extended = True
                self._deadline.start(self.options.header_timeout)
            else:
                self.transport.close()

    def _body_expired(self, error: ProxyError = BODY_TIMEOUT) -> None:
        """408 (or `error`) if nothing was answered yet, through the request, which closes
        its pod connection on the way out; else the connection ends (an answer under way
        ends short, as when the client leaves)."""
        cycle = self.cycle
        if self.serving is cycle and not cycle.response_started:
            cycle.keep_alive = False
            self.watch.expire(error)
        else:
            self.cut()

    def _refuse_body(self, error: ProxyError) -> None:
        """A body breaks a rule (malformed, too large, endless trailers): reading stops,
        since the parser is spent or must not go on, and the request ends with `error`."""
        self.transport.pause_reading()
        self._body_expired(error)

    def linger(self) -> None:
        """Close after an answer that closes the connection (`ProxyCycle`). If a body is
        still arriving (the answer refused it, or came before its end) or bytes wait
        unread, the client is likely still sending: a close then would send a reset,
        which can destroy the answer before the client reads it. So the write side is
        shut behind the answer, and what comes is read and dropped unparsed, until the
        client closes, or `LINGER` seconds or `LINGER_LIMIT` bytes run out (RFC 9112 9.6,
        nginx's lingering close). The body is not drained for the connection's sake: it
        may be hundreds of MiB. Nothing unread is not enough to close at once: all that
        came may have been read, and the rest be in flight."""
        transport = self.transport
        if (transport.is_closing() or not transport.can_write_eof()
                or (self.reading is not Reading.BODY and not unread(transport))):
            transport.close()
            return
        try:
            transport.write_eof()
        except OSError:  # asyncio's shuts down unguarded: a reset came in between
            transport.close()
            return
        self.reading = Reading.CLOSING
        self._lingered = 0
        transport.resume_reading()  # paused by flow control, or by a refused body
        self._deadline.start(LINGER)

    def _refuse(self, status: int, detail: str) -> None:
        """Answer a request the app never sees, and close, lingering (`linger`) if the
        client is still sending: a head too large is refused as it arrives, the rest of
        it on its way. With an earlier (pipelined) request's answer still going out, the
        connection just closes, that answer cut short: a second answer cannot be slipped
        in before it."""
        if self._in_flight():
            self._deadline.close()
            self.transport.close()
            return
        self.transport.write(refusal(status, detail))
        self.linger()

    def _drain(self, count: int) -> None:
        """Descriptors nearly exhausted: close the `count` oldest client connections that
        have not sent a complete request head, so this one and the next are served (nginx's
        `ngx_drain_connections`). Too few of those: the uploads quiet the longest in their
        body go too, with the 408 of `--body-timeout` (a slow POST holds a descriptor as an
        idle client does; an upload that keeps moving is the last to go)."""
        others = [c for c in self.connections if isinstance(c, HttpProtocol) and c is not self]
        idle = sorted((c for c in others if c._waiting()), key=lambda c: c.opened)[:count]
        for connection in idle:
            connection.transport.close()
        slow = sorted((c for c in others if c._uploading()),
                      key=lambda c: (c._deadline.due or math.inf, c.opened))[:count - len(idle)]
        for connection in slow:
            connection._body_expired()
        if idle:  # else every connection is busy: plain overload, nothing to say per accept
            log.warning("file descriptors nearly exhausted: closed %d idle client connections",
                        len(idle))
        if slow:
            log.warning("file descriptors nearly exhausted: closed %d client connections quiet "
                        "in a request body", len(slow))

    def _waiting(self) -> bool:
        return (self.reading is not Reading.BODY and not self._in_flight()
                and not self.transport.is_closing())

    def _uploading(self) -> bool:
        """In a request body the router is waiting for (not one it paused reading)."""
        return (self.reading is Reading.BODY and not self.flow.read_paused
                and not self.transport.is_closing())

    def pause_writing(self) -> None:
        """The client stopped reading what it is sent: `--send-timeout` starts."""
        super().pause_writing()
        seconds = self.options.send_timeout
        if seconds and self._send_timer is None:
            self._send_timer = self.loop.call_later(seconds, self._send_expired)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _send_expired(self) -> None:
        """Both connections close: the client's at once (what it left unread is dropped),
        then, through the request's cancellation, the pod's."""
        self._send_timer = None
        self.transport.abort()

    def on_body(self, body: bytes) -> None:
        """uvicorn's, less two copies of every piece of a request body: uvicorn appends
        each piece to a bytearray and hands the request a bytes copy of that. A piece that
        finds the buffer empty is handed over as the parser made it (`bytes()` of it, in
        uvicorn's `receive`, is the same object); one that finds it holding such a piece
        turns it back into a bytearray, so many small pieces in one read stay linear.
        Counted against `--max-body-size`: the piece that passes it is not handed over."""
        self._framing = 0
        self._body_bytes += len(body)
        if too_large(self._body_bytes, self.options.max_body_size):
            raise BODY_TOO_LARGE  # stops the parser: no more of this request is passed on
        cycle = self.cycle
        if cycle.body or cycle.response_complete or self.parser.should_upgrade():
            if isinstance(cycle.body, bytes):  # a piece stored whole, below
                cycle.body = bytearray(cycle.body)
            super().on_body(body)
            return
        cycle.body = body  # type: ignore[assignment]
        if len(body) > HIGH_WATER_LIMIT:
            self.flow.pause_reading()
        cycle.message_event.set()

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        """uvicorn's, less its done callback (`ProxyCycle.run_asgi` leaves `tasks`) and
        its `reset_contextvars` option, which the router does not set. A task cancelled
        before it first runs never runs `run_asgi` and so stays in `tasks`: only the
        shutdown cancels tasks that may not have started, and nothing counts them after
        it (`ClientWatch` cancels a request's task once it runs)."""
        self.serving = cycle  # with pipelining, `self.cycle` may be a later, queued request
        cycle.closing = self.linger  # type: ignore[attr-defined]  # a ProxyCycle, as above
        task = self.loop.create_task(cycle.run_asgi(app))
        cycle.tasks, cycle.task = self.tasks, task  # type: ignore[attr-defined]  # a ProxyCycle
        self.tasks.add(task)

    def cut(self) -> None:
        """See `ClientWatch.cut`."""
        if self.serving is not None:
            self.serving.disconnected = True
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        serving = self.serving
        if serving is not None and not serving.response_complete:
            # uvicorn marks only `self.cycle`, which with pipelining may be a later request
            # than the one in flight: else that one, ending unanswered, is logged as an
            # app that "returned without starting response".
            serving.disconnected = True
        self.watch.lost()
        self._let_go()

    def _let_go(self) -> None:
        """The connection is gone or became a tunnel: nothing may hold this protocol in a
        reference cycle, so that it is freed now, not at the collector's next run. Its
        watch, the upgrade handle in its requests' extensions, the parser (whose callbacks
        are its methods) and pipelined requests that will never run (through their
        `on_response`; a request that ran lets go when it ends) all held it."""
        self.watch.release()
        self._extensions.clear()
        self._handshake = None
        self._stop_timers()
        self.parser = None  # type: ignore[assignment]
        for cycle in [self.cycle, *(cycle for cycle, _ in self.pipeline)]:
            if cycle is not None and cycle is not self.serving:
                cycle.on_response = nothing
        self.pipeline.clear()

    def _stop_timers(self) -> None:
        """No HTTP timeout of this protocol applies any more: the connection is gone, or is
        a tunnel with timers of its own (`router/tunnel.py`)."""
        self._deadline.close()
        self._keep_alive.close()
        cast(ReadingFlow, self.flow).resumed = nothing
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _unsupported_upgrade_warning(self, early: bytes = b"") -> None:
        """uvicorn calls this (its `ws` setting is "none": `server_config`) when the parser
        stops at the end of a request head asking for an upgrade; that request's task has
        been started already. Instead of uvicorn's warning: the request gets a
        `ClientUpgrade`, which takes what the client sends from now on (the parser cannot
        go on past an upgrade, and bytes must wait for the pod's 101; a WebSocket client
        sends none before it), and the connection closes after an answer that is not a
        101. `early`: what followed the head in the read, kept for the tunnel."""
        if self._handshake is not None:
            return
        self._handshake = ClientUpgrade(self, early, websocket_only(self.scope["headers"]))
        self._extensions[UPGRADE] = self._handshake  # type: ignore[assignment]
        self.cycle.keep_alive = False

    def become_tunnel(self) -> asyncio.Transport:
        """The pod answered 101: this connection leaves uvicorn's books (its connections
        and tasks, which `--limit-concurrency` and uvicorn's shutdown count: tunnels have
        their own limits and drain, `router.tunnel.Tunnels`), and the request counts as
        done for uvicorn, which must not answer when the request's task returns."""
        self.connections.discard(self)
        task = asyncio.current_task()
        if task is not None:
            self.tasks.discard(task)
        if self.serving is not None:
            self.serving.disconnected = True
        self._let_go()  # its timers stopped too: a send timer armed now would abort the tunnel
        return self.transport
