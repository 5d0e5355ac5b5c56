"""Serving: listening sockets, the uvicorn settings that come from our options, the drain on
SIGTERM, and a server run in a thread (the demo pods, and tests)."""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import signal
import socket
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any, ClassVar, cast

import httptools
import uvicorn
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT, FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from router.config import Config
from router.errors import ProxyError
from router.limits import MAX_HEADERS, Deadline, connections_to_drain, refusal

log = logging.getLogger("router.server")


def bind(host: str = "127.0.0.1", port: int = 0, backlog: int = 2048) -> socket.socket:
    """A listening socket; port 0 picks a free port, read back with `getsockname()`."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    return sock


COALESCE_LIMIT = 16 * 1024
"""Writes up to this size wait for the end of the loop turn; larger ones go out at once."""


class CoalescingTransport:
    """A client connection's transport whose writes made in one turn of the event loop go
    out in one system call. uvicorn writes a response's head and its body separately; a
    proxied answer has both ready at once, and on a small answer the extra system call is
    a measurable share of the request. Everything else is the real transport's."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._pending: list[bytes] = []
        self._loop = asyncio.get_running_loop()

    def write(self, data: bytes) -> None:
        if len(data) > COALESCE_LIMIT:  # a large body part: no copy, and flow control sees it
            self._flush()
            self._transport.write(data)
            return
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if pending and not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending = []
        self._transport.abort()

    # Called per request by uvicorn's flow control: spared the `__getattr__` detour.

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def release(self) -> asyncio.Transport:
        """What was written goes out; the real transport, for a tunnel to take over."""
        self._flush()
        return self._transport


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
        """End the request with `error` (the client was too slow): cancelled wherever it
        waits, a pod connection it holds is closed, so no pod gets a silently short body."""
        if self.task is not None:
            self.expired = error
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


HEAD_TIMEOUT = "The request head did not arrive in time."
BODY_TIMEOUT = ProxyError(408, "The request body did not arrive in time.")
TRAILERS_TOO_LARGE = ProxyError(431, "The request trailers are too large.")


class HeadRefused(Exception):
    """Raised from a parser callback to stop parsing a head that will be refused."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def _nothing() -> None:
    pass


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


class ClientUpgrade:
    """The handle on a client connection whose request asks for an upgrade (`Connection:
    upgrade` plus `Upgrade`, as the parser saw them). The parser stops at the end of that
    head, so the connection carries no other request: whatever the answer, it closes after
    it, unless the pod's 101 turns it into a tunnel (`take`)."""

    __slots__ = ("_protocol",)

    def __init__(self, protocol: HttpProtocol) -> None:
        self._protocol = protocol

    def take(self) -> asyncio.Transport:
        """The client's transport, for `router.tunnel.Tunnel`; see `become_tunnel`."""
        return self._protocol.become_tunnel()


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol over a `CoalescingTransport`, telling the request it
    serves when the client goes away (the `router.disconnect` scope extension), and
    bounding what a client can make it hold (`--max-request-head`, `--header-timeout`,
    `--body-timeout`, `--send-timeout`, idle clients closed when descriptors run short).
    It relies on uvicorn's internals (`cycle.body`, `_start_asgi_task`, the parser
    callbacks): hence the pinned version."""

    options: ClassVar[Config] = Config()
    """The limits; `server_config` gives each server a subclass with its own."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.watch = ClientWatch(self)
        self._extensions = {DISCONNECT: self.watch}  # the same for every request on it
        self.serving: RequestResponseCycle | None = None
        self.reading = Reading.IDLE
        self.opened = self.loop.time()
        self._head_bytes = 0  # read since the current head began (whole reads: an upper bound)
        self._line_open = True  # no line end seen yet in the current head
        self._exact = False  # the head began inside a read: `_head_bytes` missed part of it
        self._framing = 0  # read in a body since its last piece: trailers, chunk lines
        self._deadline = Deadline(self.loop, self._expired)
        self._keep_alive = Deadline(self.loop, self.timeout_keep_alive_handler)
        self._send_timer: asyncio.TimerHandle | None = None
        super().connection_made(cast(asyncio.Transport, CoalescingTransport(transport)))
        self.flow = ReadingFlow(self.transport, self._reading_resumed)
        self._deadline.start(self.options.header_timeout)
        sock = transport.get_extra_info("socket")
        drain = connections_to_drain(sock.fileno()) if sock is not None else 0
        if drain:
            self._drain(drain)

    def data_received(self, data: bytes) -> None:
        """uvicorn's, with the head counted as it arrives: a head above
        `--max-request-head` is refused before it is all buffered (httptools keeps a
        header value whole until it ends)."""
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
            if isinstance(refused, HeadRefused):
                self._refuse(refused.status, refused.detail)
            else:
                self._bad_request()
            return
        except httptools.HttpParserError:
            self._bad_request()
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        reading = self.reading
        if reading is Reading.BODY:
            if self._framing > self.options.max_request_head:
                self.transport.pause_reading()
                self._body_expired(TRAILERS_TOO_LARGE)
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

    def _bad_request(self) -> None:
        """uvicorn's 400 went out at once, even behind a pipelined request in flight: the
        client took it for that request's answer. `_refuse` keeps the order (and answers
        in JSON, as every status of the router's own)."""
        message = "Invalid HTTP request received."
        self.logger.warning(message)
        self._refuse(400, message)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.reading = Reading.HEAD
        self.scope["extensions"] = self._extensions  # type: ignore[typeddict-item]

    def on_headers_complete(self) -> None:
        if (self._exact or self._head_bytes > self.options.max_request_head
                or len(self.headers) > MAX_HEADERS):
            self._check_head()  # the head came in large reads, or after another: count exactly
        self.reading = Reading.BODY
        self._framing = 0
        self._exact = False
        self._head_bytes = 0
        self._line_open = True
        self._deadline.stop()
        super().on_headers_complete()
        # The request's scope holds the list of its head; a chunked body's trailers, which
        # uvicorn's `on_header` appends too, go to a list nobody reads: never merged into
        # the headers (RFC 9110 6.5.1), else one in the head's read would route the request.
        self.headers = []

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
        super().on_message_complete()
        self.reading = Reading.IDLE
        self._exact = True  # if the next head begins in this read (pipelined)
        self._deadline.stop()

    def on_response_complete(self) -> None:
        """uvicorn's, with its keep-alive timer (a new timer per request, cancelled by the
        next request's first read) kept in a `Deadline` that moves without one; then, with
        no request left in flight, the next head is timed."""
        self.server_state.total_requests += 1
        if not self.transport.is_closing():
            self.flow.resume_reading()
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
        if self.reading is Reading.BODY:
            if not self.flow.read_paused:  # else the router is the one not reading
                self._body_expired()
        elif not self._in_flight():
            if self.reading is Reading.HEAD:
                self._refuse(408, HEAD_TIMEOUT)
            else:
                self.transport.close()

    def _body_expired(self, error: ProxyError = BODY_TIMEOUT) -> None:
        """408 (or `error`) if nothing was answered yet, through the request, which closes
        its pod connection on the way out; else the connection ends (an answer under way
        ends short, as when the client leaves)."""
        cycle = self.cycle
        if self.serving is cycle and not cycle.response_started and self.watch.task is not None:
            cycle.keep_alive = False
            self.watch.expire(error)
        else:
            self.cut()

    def _refuse(self, status: int, detail: str) -> None:
        """Answer a request the app never sees, and close. With an earlier (pipelined)
        request's answer still going out, the connection just closes, that answer cut
        short: a second answer cannot be slipped in before it."""
        if not self._in_flight():
            self.transport.write(refusal(status, detail))
        self._deadline.close()
        self.transport.close()

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
        turns it back into a bytearray, so many small pieces in one read stay linear."""
        self._framing = 0
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
        self.serving = cycle  # with pipelining, `self.cycle` may be a later, queued request
        super()._start_asgi_task(cycle, app)

    def cut(self) -> None:
        """See `ClientWatch.cut`."""
        if self.serving is not None:
            self.serving.disconnected = True
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.watch.lost()
        # Nothing left holding the protocol in a cycle: freed now, not by the collector.
        self.watch.release()
        self._deadline.close()
        self._keep_alive.close()
        cast(ReadingFlow, self.flow).resumed = _nothing
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        self.pipeline.clear()

    tunnelled = False
    """True once the connection is a tunnel (`become_tunnel`): no HTTP timeout or limit of
    this protocol applies to it any more; the tunnel has its own (`router/tunnel.py`)."""

    def _unsupported_upgrade_warning(self) -> None:
        """uvicorn calls this (its `ws` setting is "none": `server_config`) when the parser
        stops at the end of a request head asking for an upgrade; that request's task has
        been started already. Instead of uvicorn's warning: the request gets a
        `ClientUpgrade`, reading pauses (the parser cannot go on past an upgrade, and
        bytes must wait for the pod's 101; a WebSocket client sends none before it), and
        the connection closes after an answer that is not a 101."""
        if UPGRADE in self._extensions:
            return
        self._extensions[UPGRADE] = ClientUpgrade(self)  # type: ignore[assignment]
        self.cycle.keep_alive = False
        self.transport.pause_reading()

    def become_tunnel(self) -> asyncio.Transport:
        """The pod answered 101: this connection leaves uvicorn's books (its connections
        and tasks, which `--limit-concurrency` and uvicorn's shutdown count: tunnels have
        their own limit and drain, `router.tunnel.Tunnels`), and the request counts as
        done for uvicorn, which must not answer when the request's task returns."""
        self.tunnelled = True
        self.connections.discard(self)
        task = asyncio.current_task()
        if task is not None:
            self.tasks.discard(task)
        if self.serving is not None:
            self.serving.disconnected = True
        self._unset_keepalive_if_required()
        return cast(CoalescingTransport, self.transport).release()


def server_config(
    config: Config, app: Callable[..., Any], *, factory: bool = False,
    log_config: dict[str, Any] | None = None,
) -> uvicorn.Config:
    """uvicorn settings from our options. uvicorn's own access log, `Server` and `Date`
    headers are off, so the sandbox's headers pass unchanged; so is its proxy-headers
    rewrite, so the client address stays the peer's own. `factory` builds the app in each
    worker process; `log_config` None leaves logging as the caller set it."""
    limited = type("HttpProtocol", (HttpProtocol,), {"options": config})
    return uvicorn.Config(
        app,
        factory=factory,
        http=limited,
        host=config.host,
        port=config.port,
        workers=config.workers,
        lifespan="on",
        ws="none",  # upgrades are proxied, not served: `HttpProtocol.become_tunnel`
        access_log=False,
        proxy_headers=False,
        server_header=False,
        date_header=False,
        log_config=log_config,
        log_level=config.log_level,
        limit_concurrency=config.limit_concurrency or None,
        backlog=config.backlog,
        # uvicorn hands this to `call_later`, which takes fractions; int() made 0.5 a 0,
        # closing every connection after its first answer.
        timeout_keep_alive=config.timeout_keep_alive,  # type: ignore[arg-type]
        timeout_graceful_shutdown=max(1, int(config.shutdown_timeout)),
    )


FORCED_EXIT_WAIT = 1.0
"""Seconds the requests cancelled by a second signal get to send their 503 and end."""


class DrainingServer(uvicorn.Server):
    """uvicorn, with the drain a pod behind a Service needs on SIGTERM.

    1. `/ready` fails at once (the app's `draining` flag), while new connections are still
       served for `--drain-grace`, the time the endpoints controller needs to stop sending;
    2. then the listener closes and in-flight requests get the rest of
       `--shutdown-timeout`; what is still running after that is cancelled;
    3. the process exits 0: a drain is the normal end of a pod's life.

    SIGINT (Ctrl-C) skips the grace window; a second signal ends the drain at once, also
    with exit 0. The grace window is clipped to the budget, which includes it, and both
    are honoured to the fraction of a second.
    """

    def __init__(self, config: uvicorn.Config, options: Config) -> None:
        super().__init__(config)
        self._options = options
        self._grace = min(options.drain_grace, options.shutdown_timeout)
        if self._grace < options.drain_grace:
            log.warning("--drain-grace %g s is longer than --shutdown-timeout %g s, which "
                        "includes it: the grace window is clipped to %g s",
                        options.drain_grace, options.shutdown_timeout, self._grace)
        self._drain_started: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit or self._drain_started is not None:
            if not self.force_exit:
                log.info("second signal: ending the drain now")
            self.should_exit = self.force_exit = True
            return
        self._drain_started = time.monotonic()
        app = self.config.loaded_app
        while app is not None and not hasattr(app, "draining"):
            app = getattr(app, "app", None)  # uvicorn's wrappers, e.g. at --log-level trace
        if app is not None:
            app.draining = True
        if sig == signal.SIGINT:
            log.info("interrupted: finishing in-flight requests")
            self._stop_accepting()
        else:
            log.info("draining: /ready fails now; accepting for %g s, then finishing in-flight "
                     "requests within %g s of this signal",
                     self._grace, self._options.shutdown_timeout)

    async def on_tick(self, counter: int) -> bool:
        started = self._drain_started
        if started is not None and time.monotonic() - started >= self._grace:
            self._stop_accepting()
            return True
        return await super().on_tick(counter)

    def _stop_accepting(self) -> None:
        """Give in-flight requests what is left of the shutdown budget, then stop."""
        assert self._drain_started is not None
        spent = time.monotonic() - self._drain_started
        # uvicorn hands this to `asyncio.wait_for`, which takes fractions; only its
        # annotation says int.
        self.config.timeout_graceful_shutdown = max(  # type: ignore[assignment]
            0.0, self._options.shutdown_timeout - spent
        )
        self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's, and on a second signal an end as clean as a spent budget's: uvicorn
        then stops waiting but neither cancels the requests nor closes the app, leaving
        both to `asyncio.run`, whose cancelling of the lifespan task logs an ERROR with a
        traceback. Here the requests are cancelled (each answers 503 if its head is not
        out yet) and the app closes its pods' connections and its pod source."""
        await super().shutdown(sockets)
        if not self.force_exit or self.lifespan.shutdown_event.is_set():
            return  # a drain that ran its course, or a signal after the app had closed
        tasks = list(self.server_state.tasks)
        for task in tasks:
            task.cancel(msg="second signal")
        if tasks:
            await asyncio.wait(tasks, timeout=FORCED_EXIT_WAIT)
        await self.lifespan.shutdown()


class ServerThread:
    """A uvicorn server on an already listening socket, in a thread with its own loop.

    Binding first means callers can connect at once (the backlog holds them until the loop
    accepts), with no wait for start-up; a thread keeps uvicorn away from the process's
    signal handlers, which belong to the main server.
    """

    def __init__(
        self, config: uvicorn.Config, sock: socket.socket, name: str = "server"
    ) -> None:
        self.sock = sock
        self.host, self.port = sock.getsockname()[:2]
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, daemon=True, name=name
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ServerThread:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.signal_stop()
        self.join(timeout)

    def signal_stop(self) -> None:
        """Ask the server to finish; several can wind down at once before `join`."""
        self.server.should_exit = True

    def join(self, timeout: float = 10.0) -> None:
        self._thread.join(timeout)
        self.sock.close()
