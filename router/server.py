"""Serving: listening sockets, the uvicorn settings that come from our options, and a
server run in a thread (the demo pods, and tests)."""

from __future__ import annotations

import socket
import threading

import uvicorn

from router.app import Router
from router.config import Config


def bind(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening socket; port 0 picks a free port, read back with `getsockname()`."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock


def server_config(config: Config, app: Router) -> uvicorn.Config:
    """uvicorn settings from our options. uvicorn's own access log, `Server` and `Date`
    headers are off, so the sandbox's headers pass unchanged; so is its proxy-headers
    rewrite, so the client address stays the peer's own."""
    return uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        lifespan="on",
        access_log=False,
        proxy_headers=False,
        server_header=False,
        date_header=False,
        log_level=config.log_level,
        limit_concurrency=config.limit_concurrency or None,
        backlog=config.backlog,
        timeout_keep_alive=int(config.timeout_keep_alive),
        timeout_graceful_shutdown=int(config.shutdown_timeout),
    )


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


def run(config: Config) -> bool:
    """Serve until SIGTERM/SIGINT; False when the server could not start."""
    server = uvicorn.Server(server_config(config, Router(config)))
    server.run()
    return server.started
