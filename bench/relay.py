"""Byte relays: the floor of a 64 MiB transfer through any proxy process on this machine.

Each client connection is joined to one pod (round robin) and bytes are passed both ways
with no HTTP at all, so no proxy can relay a body for less:

- `relay`: two uvloop protocols, each read handed to the other side's transport, with
  flow control: what any uvloop-based proxy pays, the router included;
- `splice`: `splice(2)` through a pipe, kernel to kernel, no copy into the process: what
  zero-copy relaying would reach.
"""

from __future__ import annotations

import asyncio
import fcntl
import itertools
import os
import socket
from collections.abc import Callable, Sequence

SPLICE_CHUNK = 1024 * 1024
_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK if hasattr(os, "splice") else 0


class _Side(asyncio.Protocol):
    """One end of a protocol relay: what it reads, the other end writes; a full other end
    pauses its reading; once both ends have sent EOF, both connections close."""

    def __init__(self) -> None:
        self.other: _Side | None = None
        self.transport: asyncio.Transport | None = None
        self.early: list[bytes] = []  # read before the other end was connected
        self.ended = False  # its peer sent EOF
        self.lost = False

    def _peer(self) -> asyncio.Transport | None:
        return self.other.transport if self.other is not None else None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        peer = self._peer()
        if peer is None:
            self.early.append(data)
        else:
            peer.write(data)

    def eof_received(self) -> bool:
        self.ended = True
        peer = self._peer()
        if peer is not None:
            peer.write_eof()
            if self.other is not None and self.other.ended and self.transport is not None:
                self.transport.close()
                peer.close()
        return True  # half-closed: the other direction may still be running

    def pause_writing(self) -> None:
        peer = self._peer()
        if peer is not None:
            peer.pause_reading()

    def resume_writing(self) -> None:
        peer = self._peer()
        if peer is not None:
            peer.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        peer = self._peer()
        if peer is not None:
            peer.close()


class _Client(_Side):
    """The accepted end: what it reads (an EOF included) before the pod's connection is
    made waits; if it leaves meanwhile, the pod's connection is closed once made."""

    def __init__(self, pod: tuple[str, int], tasks: set[asyncio.Task[None]]) -> None:
        super().__init__()
        self._pod = pod
        self._tasks = tasks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        task = asyncio.ensure_future(self._join())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _join(self) -> None:
        assert self.transport is not None
        try:
            _, upstream = await asyncio.get_running_loop().create_connection(_Side, *self._pod)
        except OSError:
            self.transport.close()
            return
        assert upstream.transport is not None
        if self.lost:
            upstream.transport.close()
            return
        self.other, upstream.other = upstream, self
        upstream.transport.writelines(self.early)
        self.early = []
        if self.ended:
            upstream.transport.write_eof()


async def serve_relay(listener: socket.socket, pods: Sequence[tuple[str, int]]) -> None:
    turn = itertools.cycle(pods)
    tasks: set[asyncio.Task[None]] = set()
    server = await asyncio.get_running_loop().create_server(
        lambda: _Client(next(turn), tasks), sock=listener)
    await server.serve_forever()


async def _ready(register: Callable[..., None], unregister: Callable[[int], object],
                 fd: int) -> None:
    future = asyncio.get_running_loop().create_future()
    register(fd, future.set_result, None)
    try:
        await future
    finally:
        unregister(fd)


async def _splice_one_way(source: socket.socket, sink: socket.socket) -> None:
    """Until `source` ends: socket to pipe to socket, waiting on readiness in between."""
    loop = asyncio.get_running_loop()
    pipe_out, pipe_in = os.pipe()
    fcntl.fcntl(pipe_in, fcntl.F_SETPIPE_SZ, SPLICE_CHUNK)  # as much per call as we ask
    try:
        while True:
            try:
                moved = os.splice(source.fileno(), pipe_in, SPLICE_CHUNK, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                await _ready(loop.add_reader, loop.remove_reader, source.fileno())
                continue
            if moved == 0:
                sink.shutdown(socket.SHUT_WR)
                return
            while moved:
                try:
                    moved -= os.splice(pipe_out, sink.fileno(), moved, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    await _ready(loop.add_writer, loop.remove_writer, sink.fileno())
    finally:
        os.close(pipe_out)
        os.close(pipe_in)


async def _splice_connection(client: socket.socket, pod: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    upstream = socket.socket()
    upstream.setblocking(False)
    with client, upstream:
        try:
            await loop.sock_connect(upstream, pod)
            async with asyncio.TaskGroup() as both:
                both.create_task(_splice_one_way(client, upstream))
                both.create_task(_splice_one_way(upstream, client))
        except* OSError:
            pass  # a reset either way ends both directions; both sockets close


async def serve_splice(listener: socket.socket, pods: Sequence[tuple[str, int]]) -> None:
    loop = asyncio.get_running_loop()
    listener.setblocking(False)
    turn = itertools.cycle(pods)
    tasks: set[asyncio.Task[None]] = set()
    while True:
        client, _ = await loop.sock_accept(listener)
        client.setblocking(False)
        task = asyncio.ensure_future(_splice_connection(client, next(turn)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
