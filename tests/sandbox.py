"""A fake sandbox server for tests: a real ASGI app served by uvicorn on its own loopback IP.

It counts the requests it receives, remembers the last one, and its behaviour is chosen by
`mode` (set by the test) or by the request path, so one app covers every scenario.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import parse_qs

import uvicorn

from router.asgi import Receive, Scope, Send
from router.server import ServerThread, bind

CHUNK = 64 * 1024


def pattern(size: int) -> Iterator[bytes]:
    """Deterministic bytes, so a receiver can check a large body by its hash."""
    block = bytes(range(256)) * (CHUNK // 256)
    while size > 0:
        piece = block[: min(size, CHUNK)]
        size -= len(piece)
        yield piece


def pattern_sha256(size: int) -> str:
    digest = hashlib.sha256()
    for piece in pattern(size):
        digest.update(piece)
    return digest.hexdigest()


@dataclass
class Seen:
    """What the sandbox received in one request."""

    method: str
    raw_path: bytes
    query: bytes
    headers: list[tuple[str, str]]
    body_sha256: str
    body_bytes: int
    peer_port: int  # which of the router's connections it came on

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k == name.lower()]
        return values[0] if values else None


@dataclass
class Sandbox:
    """The ASGI app of one fake pod. `mode`: ok | busy | fail | slow."""

    name: str
    mode: str = "ok"
    slow_seconds: float = 5.0
    hits: int = 0
    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Set when a client of /events goes away: proof the router closed its upstream side.
    events_closed: threading.Event = field(default_factory=threading.Event)
    # /gate answers once this is set.
    gate: threading.Event = field(default_factory=threading.Event)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        digest = hashlib.sha256()
        size = 0
        more = True
        while more:
            message = await receive()
            chunk = message.get("body", b"")
            digest.update(chunk)
            size += len(chunk)
            more = message.get("more_body", False)
        seen = Seen(
            method=scope["method"],
            raw_path=scope.get("raw_path", b""),
            query=scope.get("query_string", b""),
            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]],
            body_sha256=digest.hexdigest(),
            body_bytes=size,
            peer_port=scope["client"][1],
        )
        with self.lock:
            self.hits += 1
            self.seen.append(seen)
        await self._answer(scope, seen, receive, send)

    async def _answer(self, scope: Scope, seen: Seen, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        query = parse_qs(seen.query.decode())
        if self.mode == "busy":
            await _send(send, 503, b'{"detail":"busy"}', [(b"content-type", b"application/json")])
        elif self.mode == "fail":
            await _send(send, 500, b"boom", [])
        elif self.mode == "slow" or path == "/slow":
            seconds = float(query.get("seconds", [self.slow_seconds])[0])
            await asyncio.sleep(seconds)
            await _send(send, 200, b"slow", [])
        elif path == "/download":
            await _stream(send, int(query["bytes"][0]))
        elif path == "/gate":
            await asyncio.to_thread(self.gate.wait, 10)
            await _send(send, 200, b"through", [])
        elif path == "/broken":  # half the declared body, then the sandbox crashes
            size = int(query["bytes"][0])
            headers = [(b"content-length", b"%d" % size)]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b"".join(pattern(size // 2)),
                        "more_body": True})
            raise RuntimeError("the sandbox crashed mid-answer")
        elif path == "/events":
            headers = [(b"content-type", b"text/event-stream")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b"data: hi\n\n", "more_body": True})
            await receive()  # returns only when the router drops the connection
            self.events_closed.set()
        elif path == "/hold":  # no answer at all until the router drops the connection
            await receive()
            self.events_closed.set()
        elif path == "/gzip":
            body = gzip.compress(b"hello " * 100)
            await _send(send, 200, body, [(b"content-encoding", b"gzip")])
        elif path == "/cookies":
            cookies = [(b"set-cookie", b"a=1; Path=/"), (b"set-cookie", b"b=2; Path=/")]
            await _send(send, 200, b"ok", cookies)
        elif path == "/hop":
            headers = [
                (b"connection", b"x-secret-hop"),
                (b"x-secret-hop", b"1"),
                (b"keep-alive", b"timeout=5"),
                (b"x-kept", b"yes"),
            ]
            await _send(send, 200, b"ok", headers)
        else:
            payload = {
                "pod": self.name,
                "method": seen.method,
                "raw_path": seen.raw_path.decode("latin-1"),
                "query": seen.query.decode("latin-1"),
                "body_sha256": seen.body_sha256,
                "body_bytes": seen.body_bytes,
            }
            headers = [(b"content-type", b"application/json"), (b"x-request-id", b"pod-own")]
            await _send(send, 200, json.dumps(payload).encode(), headers)


async def _send(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _stream(send: Send, size: int) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    for piece in pattern(size):
        await send({"type": "http.response.body", "body": piece, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


class Pod:
    """A running fake sandbox on `ip`, with its `Sandbox` app for the test to steer."""

    def __init__(self, name: str, ip: str, port: int = 0) -> None:
        self.app = Sandbox(name)
        self.name = name
        config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="off",
                                proxy_headers=False)  # the peer is the router's connection
        self.thread = ServerThread(config, bind(ip, port)).start()
        self.ip = ip
        self.port = self.thread.port

    def stop(self) -> None:
        self.thread.stop()
