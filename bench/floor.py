"""Reference servers that bound what any uvicorn-based router can reach on this machine,
measured in the same run as the router (`python -m bench.floor KIND --port P [--pods ...]`):

- `hello`: uvicorn answering 100 bytes itself, no upstream hop: the server's own ceiling;
- `proxy`: uvicorn plus aiohttp's client, forwarding GETs to the pods round robin with no
  routing rules, header hygiene, retries or streaming guarantees: the bare hop;
- `httpx`: the same bare hop through one shared `httpx.AsyncClient`, to compare clients;
- `relay` and `splice`: byte relays with no HTTP, the floor of a large transfer
  (bench/relay.py).

The router does what `proxy` does and more, so these say where its floor lies. The first
three run uvicorn as the router does (auto loop and HTTP parser, no `Server`/`Date`
headers).
"""

from __future__ import annotations

import argparse
import itertools
import socket
import sys
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import httpx
import uvicorn
import uvloop

from bench import relay
from bench.nginx import Pod
from bench.procs import ServerChild, free_port

BODY = b"x" * 99 + b"\n"
RELAYS = {"relay": relay.serve_relay, "splice": relay.serve_splice}
KINDS = ("hello", "proxy", "httpx", *RELAYS)

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]


async def _answer(send: Send, status: int, body: bytes) -> None:
    # A Content-Length, so uvicorn does not fall back to chunked encoding.
    headers = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def hello(scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
    if scope["type"] == "http":
        await _answer(send, 200, BODY)


class Upstream(Protocol):
    async def get(self, url: str) -> tuple[int, bytes]: ...
    async def close(self) -> None: ...


class AiohttpUpstream:
    """No connection limit (the router caps nothing either), bodies passed as they come."""

    def __init__(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)

    async def get(self, url: str) -> tuple[int, bytes]:
        async with self._session.get(url) as response:
            return response.status, await response.read()

    async def close(self) -> None:
        await self._session.close()


class HttpxUpstream:
    """Default transport; the pool is unbounded like aiohttp's above, since httpx's default
    (100 connections, 20 kept alive) would measure reconnects at c=64, not the client.
    `trust_env=False`: no proxy from the environment, the hop stays on loopback."""

    def __init__(self) -> None:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        self._client = httpx.AsyncClient(limits=limits, trust_env=False)

    async def get(self, url: str) -> tuple[int, bytes]:
        response = await self._client.get(url)
        return response.status_code, response.content

    async def close(self) -> None:
        await self._client.aclose()


def bare_proxy(origins: Sequence[str], upstream: Callable[[], Upstream]) -> App:
    """GET `path` from the next origin and answer its status and body, nothing else. The
    client is made at lifespan start-up, inside the server's event loop."""
    turn = itertools.cycle(origins)
    clients: list[Upstream] = []

    async def app(scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    clients.append(upstream())
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await clients[0].close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] == "http":
            status, body = await clients[0].get(next(turn) + scope["path"])
            await _answer(send, status, body)

    return app


class FloorProcess(ServerChild):
    """One reference server as the bench's child, on a port picked for it; ready once `/`
    answers (for the proxies, relayed from a pod)."""

    def __init__(self, name: str, kind: str, workdir: Path, pods: Sequence[Pod] = ()) -> None:
        port = free_port()
        argv = [sys.executable, "-m", "bench.floor", kind, "--port", str(port)]
        if pods:
            argv += ["--pods", ",".join(f"{p.host}:{p.port}" for p in pods)]
        super().__init__(name, argv, workdir / f"floor-{kind}.log", port, "/")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pods", default="", help="HOST:PORT,... for the proxies")
    args = parser.parse_args()
    if args.kind != "hello" and not args.pods:
        parser.error(f"{args.kind} needs --pods")
    pods = args.pods.split(",")
    if args.kind in RELAYS:
        listener = socket.create_server(("127.0.0.1", args.port), backlog=2048)
        addresses = [(host, int(port)) for host, port in (p.rsplit(":", 1) for p in pods)]
        uvloop.run(RELAYS[args.kind](listener, addresses))
        return
    app: App = hello
    if args.kind != "hello":
        origins = [f"http://{pod}" for pod in pods]
        app = bare_proxy(origins, AiohttpUpstream if args.kind == "proxy" else HttpxUpstream)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False,
                lifespan="off" if args.kind == "hello" else "on", proxy_headers=False,
                server_header=False, date_header=False)


if __name__ == "__main__":
    main()
