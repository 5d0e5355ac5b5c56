"""Serving: listening sockets, the uvicorn settings that come from our options, the drain on
SIGTERM, and a server run in a thread (the demo pods, and tests)."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any, cast

import uvicorn
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from router.config import Config

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
    it was cancelled."""

    __slots__ = ("task", "gone", "_protocol")

    def __init__(self, protocol: HttpProtocol) -> None:
        self.task: asyncio.Task[Any] | None = None
        self.gone = False
        self._protocol = protocol

    def lost(self) -> None:
        if self.task is not None:
            self.gone = True
            self.task.cancel()
            self.task = None

    def cut(self) -> None:
        """End the connection under an answer that cannot be finished (the pod failed
        mid-body): what is buffered still goes out, then the client sees the connection
        end short of the declared length or the last chunk, the only signal left once the
        head is out. The request counts as disconnected, so uvicorn does not also log the
        app as broken for returning early."""
        self._protocol.cut()


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
    serves when the client goes away (the `router.disconnect` scope extension). It relies
    on uvicorn's internals (`cycle.body`, `_start_asgi_task`): hence the pinned version."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.watch = ClientWatch(self)
        self._extensions = {DISCONNECT: self.watch}  # the same for every request on it
        self.serving: RequestResponseCycle | None = None
        super().connection_made(cast(asyncio.Transport, CoalescingTransport(transport)))

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["extensions"] = self._extensions  # type: ignore[typeddict-item]

    def on_body(self, body: bytes) -> None:
        """uvicorn's, less two copies of every piece of a request body: uvicorn appends
        each piece to a bytearray and hands the request a bytes copy of that. A piece that
        finds the buffer empty is handed over as the parser made it (`bytes()` of it, in
        uvicorn's `receive`, is the same object); one that finds it holding such a piece
        turns it back into a bytearray, so many small pieces in one read stay linear."""
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
    return uvicorn.Config(
        app,
        factory=factory,
        http=HttpProtocol,
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
        timeout_keep_alive=int(config.timeout_keep_alive),
        timeout_graceful_shutdown=max(1, int(config.shutdown_timeout)),
    )


class DrainingServer(uvicorn.Server):
    """uvicorn, with the drain a pod behind a Service needs on SIGTERM.

    1. `/ready` fails at once (the app's `draining` flag), while new connections are still
       served for `--drain-grace`, the time the endpoints controller needs to stop sending;
    2. then the listener closes and in-flight requests get the rest of
       `--shutdown-timeout`; what is still running after that is cancelled;
    3. the process exits 0: a drain is the normal end of a pod's life.

    SIGINT (Ctrl-C) skips the grace window; a second signal stops at once.
    """

    def __init__(self, config: uvicorn.Config, options: Config) -> None:
        super().__init__(config)
        self._options = options
        self._drain_started: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit or self._drain_started is not None:
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
                     self._options.drain_grace, self._options.shutdown_timeout)

    async def on_tick(self, counter: int) -> bool:
        started = self._drain_started
        if started is not None and time.monotonic() - started >= self._options.drain_grace:
            self._stop_accepting()
            return True
        return await super().on_tick(counter)

    def _stop_accepting(self) -> None:
        """Give in-flight requests what is left of the shutdown budget, then stop."""
        assert self._drain_started is not None
        spent = time.monotonic() - self._drain_started
        self.config.timeout_graceful_shutdown = max(1, int(self._options.shutdown_timeout - spent))
        self.should_exit = True


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
