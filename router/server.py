"""Serving: listening sockets, the uvicorn settings that come from our options (with the
client protocol of `router/protocol.py`), the drain on SIGTERM, and a server run in a
thread (the demo pods, and tests)."""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn

from router.accepting import AcceptBurst
from router.config import Config
from router.protocol import HttpProtocol

log = logging.getLogger("router.server")


def bind(host: str = "127.0.0.1", port: int = 0, backlog: int = 2048,
         shared: bool = False) -> socket.socket:
    """A listening socket; port 0 picks a free port, read back with `getsockname()`.
    `shared`: one of a group on the same port (`bind_group`)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if shared:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    return sock


def bind_group(host: str, port: int, backlog: int, count: int) -> list[socket.socket]:
    """`count` listening sockets on one port (SO_REUSEPORT), one per `--workers` process:
    the kernel spreads new connections over them by a hash of their addresses, so every
    worker accepts from a queue of its own. From one shared socket, whichever worker woke
    first took what waited (with accept bursts, up to 512 at once): 256 connections opened
    together split 28/228 between two workers. Each socket has the whole `backlog`.
    Port 0 picks one free port for the whole group."""
    first = bind(host, port, backlog, shared=True)
    port = first.getsockname()[1]
    return [first, *(bind(host, port, backlog, shared=True) for _ in range(count - 1))]


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


class AcceptingServer(uvicorn.Server):
    """uvicorn's server, whose connections take the rest of the accept queue with them
    (`router.accepting`)."""

    _burst: AcceptBurst | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        protocol = self.config.http_protocol_class
        if not self.started or not issubclass(protocol, HttpProtocol):
            return
        factory = functools.partial(protocol, config=self.config,
                                    server_state=self.server_state,
                                    app_state=self.lifespan.state)
        listening = [sock.fileno() for server in self.servers for sock in server.sockets]
        self._burst = protocol.burst = AcceptBurst(asyncio.get_running_loop(), listening,
                                                   factory)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self._burst is not None:
            self._burst.close()
        await super().shutdown(sockets)


class DrainingServer(AcceptingServer):
    """uvicorn, with the drain a pod behind a Service needs on SIGTERM.

    1. `/ready` fails at once (the app's `draining` flag), while new connections are still
       served for `--drain-grace`, the time the endpoints controller needs to stop sending;
    2. then the listener closes and in-flight requests get the rest of
       `--shutdown-timeout`; what is still running after that is cancelled;
    3. the process exits 0: a drain is the normal end of a pod's life.

    SIGINT (Ctrl-C) skips the grace window; a second signal ends the drain at once, also
    with exit 0. The grace window is clipped to the budget, which includes it, and both
    are honoured to the fraction of a second. A `--workers` process (`supervised`) takes
    no SIGINT: a Ctrl-C reaches it and its supervisor, which passes it on as SIGTERM.
    """

    def __init__(self, config: uvicorn.Config, options: Config, supervised: bool = False
                 ) -> None:
        super().__init__(config)
        self._options = options
        self._supervised = supervised
        self._grace = min(options.drain_grace, options.shutdown_timeout)
        if self._grace < options.drain_grace:
            log.warning("--drain-grace %g s is longer than --shutdown-timeout %g s, which "
                        "includes it: the grace window is clipped to %g s",
                        options.drain_grace, options.shutdown_timeout, self._grace)
        self._drain_started: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGINT and self._supervised:
            return
        if self.should_exit or self._drain_started is not None:
            if not self.force_exit:
                log.info("second signal: ending the drain now")
            self.should_exit = self.force_exit = True
            return
        self._drain_started = time.monotonic()
        self._mark_draining()
        if sig == signal.SIGINT:
            log.info("interrupted: finishing in-flight requests")
            self._stop_accepting()
        else:
            log.info("draining: /ready fails now; accepting for %g s, then finishing in-flight "
                     "requests within %g s of this signal",
                     self._grace, self._options.shutdown_timeout)

    def _mark_draining(self) -> None:
        """`/ready` fails from now: the app's `draining` flag, once the app is loaded."""
        app = getattr(self.config, "loaded_app", None)  # None: a signal before the app loads
        while app is not None and not hasattr(app, "draining"):
            app = getattr(app, "app", None)  # uvicorn's wrappers, e.g. at --log-level trace
        if app is not None:
            app.draining = True

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's, after the app has loaded: a signal that came before found no app to
        mark, so the drain it began is marked now, before anything is accepted."""
        if self._drain_started is not None:
            self._mark_draining()
        await super().startup(sockets)

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
        self.server = AcceptingServer(config)
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
