"""Fault pods: raw asyncio HTTP/1.1 servers on 127.0.0.2.. (one shared port) that log what
they receive and misbehave on a schedule, in a process of their own.

States, flipped per pod every 0.2-1 s at random:

- `normal`: answers at once;
- `busy`: answers 503;
- `slow`: answers after 0.2-2 s (a state change meanwhile applies: dying resets it);
- `dead`: listener closed and every connection reset (RST), in-flight requests included;
- `restarting`: listener closed, in-flight requests finish with `Connection: close`, idle
  connections closed; it comes back with the next flip;
- `cutting`: answers over 64 KiB stop at half their declared length (connection reset).

Storms put every pod into `busy` or `dead` at once for 0.3-1 s. Each pod logs, for every
request whose head it received, the request id and how its part ended (`Receipt`), and
the times it was not listening (`Outage`), so the verdict can tell what the router could
and could not have known.

Requests: `GET /get?size=N` answers N bytes of the shared `block`; any request with a
body answers `{"pod","sha256","bytes"}` of the body received.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import socket
import struct
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import cast
from urllib.parse import parse_qs, urlsplit

import httptools

STATES = ("normal", "busy", "slow", "dead", "restarting", "cutting")
WEIGHTS = (40, 15, 15, 10, 10, 10)
CUT_ABOVE = 64 * 1024
PIECE = 64 * 1024
BLOCK_SIZE = 8 * 1024 * 1024
BUSY = b'{"detail":"busy"}'


def block(seed: int) -> bytes:
    """The bytes both sides draw bodies from: random, so a misplaced byte cannot match."""
    return random.Random(seed).randbytes(BLOCK_SIZE)


@dataclass(frozen=True)
class Receipt:
    """One request head a pod received, and how its part ended: `answered` (the whole
    answer written; `status` says which), `cut` (stopped mid-body on purpose) or `reset`
    (the connection went before the answer was whole: the pod died, or the router left)."""

    pod: str
    request_id: str
    method: str
    received: float
    ended: float
    end: str
    status: int


@dataclass(frozen=True)
class Outage:
    """A time a pod's listener was closed: connects were refused."""

    pod: str
    start: float
    end: float


@dataclass
class Log:
    receipts: list[Receipt] = field(default_factory=list)
    outages: list[Outage] = field(default_factory=list)
    resets: list[tuple[str, float]] = field(default_factory=list)  # a pod died: (pod, when)


class Pod:
    def __init__(self, name: str, host: str, port: int, data: bytes, log: Log) -> None:
        self.name, self.host, self.port = name, host, port
        self.data = data
        self.log = log
        self.state = "normal"
        self.server: asyncio.Server | None = None
        self.closed_at = 0.0
        self.connections: set[PodConnection] = set()

    async def listen(self) -> None:
        if self.server is not None:
            return
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(1024)
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: PodConnection(self), sock=sock)
        if self.closed_at:
            self.log.outages.append(Outage(self.name, self.closed_at, time.monotonic()))
            self.closed_at = 0.0

    def close_listener(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
            self.closed_at = time.monotonic()

    async def enter(self, state: str) -> None:
        self.state = state
        if state == "dead":
            self.close_listener()
            self.log.resets.append((self.name, time.monotonic()))
            for connection in list(self.connections):
                connection.reset()
        elif state == "restarting":
            self.close_listener()
            for connection in list(self.connections):
                connection.close_when_idle()
        else:
            await self.listen()


class PodConnection(asyncio.Protocol):
    """One connection to a pod: parses requests, answers each as the pod's state says."""

    def __init__(self, pod: Pod) -> None:
        self.pod = pod
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None
        self.current: tuple[str, str, float] | None = None  # request id, method, received
        self.writable = asyncio.Event()
        self.writable.set()
        self.closing = False
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.digest = hashlib.sha256()
        self.size = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.pod.connections.add(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.reset()

    def on_message_begin(self) -> None:
        self.url, self.headers = b"", {}
        self.digest, self.size = hashlib.sha256(), 0

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        request_id = self.headers.get(b"x-request-id", b"").decode()
        self.current = (request_id, self.parser.get_method().decode(), time.monotonic())

    def on_body(self, body: bytes) -> None:
        self.digest.update(body)
        self.size += len(body)

    def on_message_complete(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.answer(self.pod.state))

    async def answer(self, state: str) -> None:
        if state == "slow":
            await asyncio.sleep(random.uniform(0.2, 2.0))
        restarting = self.pod.state == "restarting"
        extra = b"connection: close\r\n" if restarting else b""
        if state == "busy":
            self.write_head(503, len(BUSY), extra)
            self.write(BUSY)
            self.ended("answered", 503)
        elif self.current is not None and self.current[1] == "GET":
            size = int(parse_qs(urlsplit(self.url.decode()).query).get("size", ["0"])[0])
            self.write_head(200, size, extra)
            cut = size // 2 if state == "cutting" and size > CUT_ABOVE else None
            sent = 0
            while sent < (size if cut is None else cut):
                piece = self.pod.data[sent:min(sent + PIECE, size if cut is None else cut)]
                self.write(piece)
                sent += len(piece)
                await self.writable.wait()
            if cut is not None:
                self.ended("cut", 200)
                self.reset()
                return
            self.ended("answered", 200)
        else:
            body = json.dumps({"pod": self.pod.name, "sha256": self.digest.hexdigest(),
                               "bytes": self.size}).encode()
            self.write_head(200, len(body), extra)
            self.write(body)
            self.ended("answered", 200)
        if restarting or self.closing:
            self.close()

    def write_head(self, status: int, length: int, extra: bytes) -> None:
        reason = b"OK" if status == 200 else b"Service Unavailable"
        self.write(b"HTTP/1.1 %d %s\r\ncontent-length: %d\r\n%s\r\n"
                   % (status, reason, length, extra))

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def ended(self, end: str, status: int) -> None:
        if self.current is not None:
            request_id, method, received = self.current
            self.pod.log.receipts.append(Receipt(self.pod.name, request_id, method, received,
                                                 time.monotonic(), end, status))
        self.current = None
        self.task = None

    def close_when_idle(self) -> None:
        if self.current is None:
            self.close()
        else:
            self.closing = True

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def reset(self) -> None:
        """Close with a RST, as a killed process's connections end."""
        if self.transport is None or self.transport.is_closing():
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.pod.connections.discard(self)
        self.writable.set()
        if self.task is not None:
            self.task.cancel()
        if self.current is not None:
            self.ended("reset", 0)


async def chaos(pods: list[Pod], rng: random.Random, storming: asyncio.Event) -> None:
    """Every pod flips on its own; storms take all of them at once."""

    async def flip(pod: Pod) -> None:
        while True:
            await asyncio.sleep(rng.uniform(0.2, 1.0))
            if not storming.is_set():
                await pod.enter(rng.choices(STATES, WEIGHTS)[0])

    async def storms() -> None:
        while True:
            await asyncio.sleep(rng.uniform(3.0, 8.0))
            storming.set()
            state = rng.choice(("busy", "dead"))
            for pod in pods:
                await pod.enter(state)
            await asyncio.sleep(rng.uniform(0.3, 1.0))
            for pod in pods:
                await pod.enter("normal")
            storming.clear()

    await asyncio.gather(storms(), *(flip(pod) for pod in pods))


async def serve(hosts: list[str], port: int, seed: int, pipe: Connection) -> None:
    log = Log()
    data = block(seed)
    pods = [Pod(f"p{index}", host, port, data, log) for index, host in enumerate(hosts)]
    for pod in pods:
        await pod.listen()
    pipe.send("listening")
    loop = asyncio.get_running_loop()
    faults = loop.create_task(chaos(pods, random.Random(seed), asyncio.Event()))
    await loop.run_in_executor(None, pipe.recv)  # "stop"
    faults.cancel()
    for pod in pods:
        await pod.enter("normal")
        pod.close_listener()
        for connection in list(pod.connections):
            connection.close()
    await asyncio.sleep(0.1)
    pipe.send(log)


def main(hosts: list[str], port: int, seed: int, pipe: Connection) -> None:
    """The pods' process (spawned): serves until told to stop, then sends back its log."""
    try:
        import uvloop

        uvloop.run(serve(hosts, port, seed, pipe))
    except ImportError:
        asyncio.run(serve(hosts, port, seed, pipe))
