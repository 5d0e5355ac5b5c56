"""`--demo N`: N small sandbox servers on loopback, so the router can be tried with no
cluster. Each answers with its own name, which makes round robin visible with curl."""

from __future__ import annotations

import asyncio
import json
import socket
import threading

import uvicorn

from router.asgi import ASGIApp, Receive, Scope, Send
from router.pods import Pod, Snapshot


def bind(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening socket; port 0 picks a free port, read back with `getsockname()`."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


class ServerThread:
    """A uvicorn server on an already listening socket, in a thread with its own loop.

    Binding first means callers can connect at once (the backlog holds them until the loop
    accepts), with no wait for start-up; a thread keeps uvicorn away from the process's
    signal handlers, which belong to the main server.
    """

    def __init__(self, app: ASGIApp, sock: socket.socket, **options: object) -> None:
        self.sock = sock
        self.host, self.port = sock.getsockname()[:2]
        config = uvicorn.Config(app, log_level="warning", access_log=False, **options)  # type: ignore[arg-type]
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, daemon=True, name="server"
        )

    def start(self) -> ServerThread:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
        self.sock.close()


def sandbox_app(name: str) -> ASGIApp:
    """A stand-in sandbox: reads the body and says who answered and what it received."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        size = 0
        more = True
        while more:
            message = await receive()
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
        payload = {
            "pod": name,
            "method": scope["method"],
            "path": scope["path"],
            "body_bytes": size,
        }
        body = json.dumps(payload).encode() + b"\n"
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return app


class DemoPool:
    """A static pod source whose pods it starts itself."""

    def __init__(self, count: int, namespace: str) -> None:
        self._count = count
        self._namespace = namespace
        self._servers: list[ServerThread] = []
        self._snapshot: Snapshot | None = None

    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    def not_ready_reason(self) -> str | None:
        return None if self._snapshot is not None else "demo pods not started"

    async def start(self) -> None:
        pods = []
        for index in range(self._count):
            name = f"demo-{index}"
            server = ServerThread(sandbox_app(name), bind()).start()
            self._servers.append(server)
            pods.append(Pod(name, self._namespace, server.host, server.port))
        self._snapshot = Snapshot.of(pods)

    async def stop(self) -> None:
        servers, self._servers = self._servers, []
        await asyncio.gather(*(asyncio.to_thread(server.stop) for server in servers))
