"""`--demo N`: N small sandbox servers on loopback, so the router can be tried with no
cluster. Each answers with its own name, which makes round robin visible with curl."""

from __future__ import annotations

import asyncio
import json
import logging

import uvicorn

from router.asgi import ASGIApp, Receive, Scope, Send
from router.pods import Pod, Snapshot
from router.server import ServerThread, bind

DEMO_THREAD = "demo-pod"


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

    operator_chosen = True

    def __init__(self, count: int, namespace: str) -> None:
        self._count = count
        self._namespace = namespace
        self._servers: list[ServerThread] = []
        self._snapshot: Snapshot | None = None

    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    def not_ready_reason(self) -> str | None:
        return None if self._snapshot is not None else "demo pods not started"

    def age(self) -> float | None:
        return None if self._snapshot is None else 0.0

    def last_error(self) -> str | None:
        return None

    async def start(self) -> None:
        logging.getLogger("uvicorn.error").addFilter(_quiet_demo_pods)
        pods = []
        for index in range(self._count):
            name = f"demo-{index}"
            app = uvicorn.Config(
                sandbox_app(name), log_config=None, access_log=False, lifespan="off"
            )
            server = ServerThread(app, bind(), name=DEMO_THREAD).start()
            self._servers.append(server)
            pods.append(Pod(name, self._namespace, server.host, server.port))
        self._snapshot = Snapshot.of(pods)

    async def stop(self) -> None:
        servers, self._servers = self._servers, []
        await asyncio.gather(*(asyncio.to_thread(server.stop) for server in servers))
        logging.getLogger("uvicorn.error").removeFilter(_quiet_demo_pods)


def _quiet_demo_pods(record: logging.LogRecord) -> bool:
    """The demo pods share uvicorn's logger with the router; only the router's lines show."""
    return record.threadName != DEMO_THREAD
