"""The upstream client against scripted HTTP servers on loopback: framing, keep-alive,
stale pooled connections, timeouts and broken answers, byte for byte."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import struct
import time
import types
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from router import upstream
from router.asgi import Message
from router.body import Budget, RequestBody
from router.connection import DRAIN_LIMIT, Response
from router.errors import ConnectFailed, ProxyError, UpstreamFailed, UpstreamTimeout
from router.sockets import POD_SEND_BUFFER
from router.upstream import Client, Timeout
from tests.loops import LOOPS

LIMITS = Timeout(read=2.0, connect=2.0)
Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Scripted:
    """A TCP server on 127.0.0.2 answering with raw bytes: every request head it read
    and every connection it accepted are recorded."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.heads: list[bytes] = []
        self.bodies: list[bytes] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Scripted:
        self._server = await asyncio.start_server(self._handle, "127.0.0.2", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        self.heads.append(head)
        body = b""
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                body = await reader.readexactly(int(line.split(b":")[1]))
            if line.lower() == b"transfer-encoding: chunked":
                body = await _read_chunked(reader)
        self.bodies.append(body)
        return head


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts = []
    while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)
    await reader.readexactly(2)
    return b"".join(parts)


def answering(*answers: bytes, close: bool = False) -> Callable[[Scripted], Script]:
    """The answers in turn, across connections; a connection ends after an answer that
    says `connection: close`, or after every answer with `close`."""

    def script_for(server: Scripted) -> Script:
        remaining = iter(answers)

        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                await server.read_request(reader)
                answer = next(remaining)
                writer.write(answer)
                await writer.drain()
                if close or b"connection: close" in answer:
                    return

        return script

    return script_for


def one_answer_per_connection(server: Scripted) -> Script:
    """Each connection answers one request, then reads the next one and drops it
    unanswered: a pod that died with the request (`tests/test_replay.py` has the idle
    close)."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(OK)
        await writer.drain()
        await server.read_request(reader)

    return script


OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


def run(scenario: Callable[[Scripted, Client], Awaitable[None]],
        script_for: Callable[[Scripted], Script],
        loop: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop) -> None:
    async def main() -> None:
        server = Scripted(lambda r, w: asyncio.sleep(0))
        server.script = script_for(server)
        client = Client()
        async with server:
            try:
                await scenario(server, client)
            finally:
                await client.close()

    with asyncio.Runner(loop_factory=loop) as runner:
        runner.run(main())


async def get(server: Scripted, client: Client, method: str = "GET",
              body: bytes | AsyncIterator[bytes] | None = None,
              length: int | None = None) -> tuple[Response, bytes]:
    response = await client.request(method, "127.0.0.2", server.port, "/a%2Fb?q=1",
                                    [("x-one", "1")], body, LIMITS, length)
    data = await response.read()
    response.release()
    return response, data


def test_connections_are_reused_and_the_request_is_sent_as_given() -> None:
    async def scenario(server: Scripted, client: Client) -> None:
        for _ in range(5):
            response, data = await get(server, client)
            assert (response.status, data) == (200, b"ok")
        assert server.connections == 1
        assert server.heads[0] == (
            f"GET /a%2Fb?q=1 HTTP/1.1\r\nhost: 127.0.0.2:{server.port}\r\nx-one: 1\r\n\r\n"
        ).encode()

    run(scenario, answering(*[OK] * 5))


def test_a_released_answer_is_freed_without_a_collection() -> None:
    """No cyclic garbage per request: under load, the cyclic collector's runs cost more
    the more requests are in flight (`router.run._settle_heap`)."""
    async def scenario(server: Scripted, client: Client) -> None:
        response, data = await get(server, client)
        assert data == b"ok"
        freed = weakref.ref(response)
        del response
        assert freed() is None

    gc.collect()
    gc.disable()
    try:
        run(scenario, answering(OK))
    finally:
        gc.enable()


def misbehaving(server: Scripted) -> Script:
    """Each request's path says how it fails: `/drop` (closed unanswered), `/invalid`, `/cut`
    (mid-body), `/early` (answered before the body it reads), else silence. The path goes
    to `server.heads` when its head is in, and to `server.bodies` once the router has
    closed the connection."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        path = (await reader.readuntil(b"\r\n\r\n")).split(b" ")[1]
        server.heads.append(path)
        if path == b"/invalid":
            writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        elif path == b"/cut":
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part")
        elif path == b"/early":
            writer.write(OK)
        await writer.drain()
        if path not in (b"/drop", b"/cut"):
            await reader.read()
        server.bodies.append(path)

    return script


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_failed_exchanges_leave_no_cyclic_garbage(loop_name: str) -> None:
    """Every way an exchange fails frees what it held by reference counting: cycles made on
    failure paths (an error kept on its answer, a connect task, a cancelled body writer)
    held their pod connections until a collection, and made collections more frequent."""
    async def endless() -> AsyncIterator[bytes]:
        yield b"x"
        await asyncio.Event().wait()

    async def scenario(server: Scripted, client: Client) -> None:
        port = server.port
        failed = []
        for path, target_port, limits in [
            ("/drop", port, LIMITS), ("/invalid", port, LIMITS), ("/cut", port, LIMITS),
            ("/silent", port, Timeout(read=0.1, connect=1)), ("/", 1, LIMITS),
            ("/", full.getsockname()[1], Timeout(read=1, connect=0.1)),
        ]:
            try:
                response = await client.request("GET", "127.0.0.2", target_port, path, [],
                                                None, limits)
                try:
                    await response.read()
                finally:
                    response.release()
            except ProxyError as error:
                failed.append(type(error))
        assert failed == [UpstreamFailed, UpstreamFailed, UpstreamFailed, UpstreamTimeout,
                          ConnectFailed, ConnectFailed]  # refused, then timed out
        early = await client.request("POST", "127.0.0.2", port, "/early", [], endless(), LIMITS)
        assert early.status == 200
        early.release()  # the body still going out is cancelled
        abandoned = asyncio.ensure_future(
            client.request("GET", "127.0.0.2", port, "/abandoned", [], None, LIMITS))
        for _ in range(500):  # until the pod has the request
            if len(server.heads) == 6:
                break
            await asyncio.sleep(0.01)
        abandoned.cancel()
        with pytest.raises(asyncio.CancelledError):
            await abandoned
        for _ in range(500):  # until the grace has run out and the connection is closed
            if len(server.bodies) == 6:
                break
            await asyncio.sleep(0.01)
        assert sorted(server.bodies) == sorted(
            [b"/drop", b"/invalid", b"/cut", b"/silent", b"/early", b"/abandoned"])

    full, waiting = listener_that_accepts_nothing()
    try:
        held = cyclic_garbage(lambda: run(scenario, misbehaving, LOOPS[loop_name]))
    finally:
        for sock in [full, *waiting]:
            sock.close()
    assert held == [], held


def cyclic_garbage(work: Callable[[], None]) -> list[str]:
    """What of the router's own `work` left in reference cycles, the collector off while
    it ran (`_describe`)."""
    gc.collect()
    gc.disable()
    try:
        work()
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        return sorted({_describe(thing) for thing in gc.garbage if _describe(thing)})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def listener_that_accepts_nothing() -> tuple[socket.socket, list[socket.socket]]:
    """A listening socket on 127.0.0.2 whose accept queue is full: a connect to it gets no
    answer (its SYN is dropped), so only the connect timeout ends it."""
    full = socket.socket()
    full.bind(("127.0.0.2", 0))
    full.listen(0)
    waiting = []
    for _ in range(4):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(full.getsockname())
        waiting.append(sock)
    return full, waiting


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_a_connect_cancelled_once_made_leaves_no_cyclic_garbage(
    loop_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request is cancelled (its client left) after the pod's connection was made but
    before `create_connection` returned it: uvloop then closes the transport without
    `connection_lost`, which the connection relies on to let go of its deadline and
    transport, each holding it in a cycle."""
    pending: list[asyncio.Future[object]] = []

    class CancelledOnceMade(upstream.Connection):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            pending[0].cancel()

    monkeypatch.setattr(upstream, "Connection", CancelledOnceMade)

    async def scenario(server: Scripted, client: Client) -> None:
        for _ in range(3):
            pending[:] = [asyncio.ensure_future(
                client.request("GET", "127.0.0.2", server.port, "/", [], None, LIMITS))]
            with pytest.raises(asyncio.CancelledError):
                await pending[0]
        pending.clear()
        for _ in range(10):  # loop turns: the transports' close callbacks run
            await asyncio.sleep(0)

    held = cyclic_garbage(lambda: run(scenario, answering(OK), LOOPS[loop_name]))
    assert held == [], held


def _describe(thing: object) -> str | None:
    """The router's own part of some cyclic garbage: its objects, its errors, its frames."""
    if isinstance(thing, types.FrameType):
        filename = thing.f_code.co_filename
        return f"frame {thing.f_code.co_name}" if f"{os.sep}router{os.sep}" in filename else None
    module = type(thing).__module__
    return type(thing).__qualname__ if module.startswith("router.") else None


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_a_pooled_connection_dropped_after_the_request_is_not_replayed(method: str) -> None:
    async def scenario(server: Scripted, client: Client) -> None:
        await get(server, client)
        with pytest.raises(UpstreamFailed):
            await get(server, client, method, b"data")
        assert server.connections == 1
        assert len(server.heads) == 2  # sent once, dropped unanswered, never sent again

    run(scenario, one_answer_per_connection)


def test_bodies_are_framed_as_declared() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b"ab"
        yield b"cd"

    async def scenario(server: Scripted, client: Client) -> None:
        await get(server, client, "POST", b"")
        await get(server, client, "POST", chunks())
        await get(server, client, "PUT", chunks(), length=4)
        assert b"content-length: 0\r\n" in server.heads[0]
        assert b"transfer-encoding: chunked\r\n" in server.heads[1]
        assert b"content-length: 4\r\n" in server.heads[2]
        assert server.bodies == [b"", b"abcd", b"abcd"]

    run(scenario, answering(OK, OK, OK))


def test_head_informational_chunked_and_close_delimited_answers() -> None:
    async def scenario(server: Scripted, client: Client) -> None:
        response, data = await get(server, client, "HEAD")
        assert (response.status, response.content_length, data) == (200, 10, b"")
        response, data = await get(server, client)
        assert (response.status, data) == (200, b"chunked!")
        assert (b"x-final", b"1") in response.raw_headers
        response, data = await get(server, client)
        assert (response.status, data) == (200, b"until the end")
        assert server.connections == 1

    run(scenario, answering(
        b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nx-final: 1\r\ntransfer-encoding: chunked\r\n\r\n"
        b"4\r\nchun\r\n4\r\nked!\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil the end",
        close=False,
    ))


def test_a_silent_pod_times_out() -> None:
    async def scenario(server: Scripted, client: Client) -> None:
        with pytest.raises(UpstreamTimeout):
            await client.request("GET", "127.0.0.2", server.port, "/", [], None,
                                 Timeout(read=0.2, connect=1))

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    run(scenario, lambda server: silent)


def test_a_shorter_read_timeout_holds_on_a_pooled_connection() -> None:
    """The connection's read timer, armed for a long wait by the first request, ends a
    shorter one of the next in time (`limits.Deadline` re-arms earlier)."""
    async def scenario(server: Scripted, client: Client) -> None:
        response = await client.request("GET", "127.0.0.2", server.port, "/", [], None,
                                         Timeout(read=60, connect=1))
        assert await response.read() == b"ok"
        response.release()
        async with asyncio.timeout(10):  # not the first request's 60 s
            with pytest.raises(UpstreamTimeout):
                await client.request("GET", "127.0.0.2", server.port, "/", [], None,
                                     Timeout(read=0.2, connect=1))
        assert server.connections == 1

    def answer_once_then_silent(server: Scripted) -> Script:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_request(reader)
            writer.write(OK)
            await writer.drain()
            await reader.read()

        return script

    run(scenario, answer_once_then_silent)


def test_refused_connections_fail_before_anything_is_sent() -> None:
    async def scenario(server: Scripted, client: Client) -> None:
        with pytest.raises(ConnectFailed):
            await client.request("GET", "127.0.0.2", 1, "/", [], None, LIMITS)
        with pytest.raises(ConnectFailed):  # a name that does not resolve
            await Client(_no_names).request("GET", "sandbox.invalid", 80, "/", [], None, LIMITS)

    run(scenario, answering(OK))


async def _no_names(host: str) -> str:
    raise OSError(f"unknown host {host}")


def test_broken_and_truncated_answers_fail() -> None:
    async def scenario(server: Scripted, client: Client) -> None:
        with pytest.raises(UpstreamFailed):
            await get(server, client)
        with pytest.raises(UpstreamFailed):
            await get(server, client)

    run(scenario, answering(
        b"NOT HTTP AT ALL\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part",
        close=True,
    ))


def test_bytes_beyond_an_answer_are_dropped_with_the_connection() -> None:
    async def scenario(server: Scripted, client: Client) -> None:
        response, data = await get(server, client, "HEAD")
        assert (data, response.reusable) == (b"", False)
        response, data = await get(server, client)
        assert (data, response.reusable) == (b"hello", False)
        response, data = await get(server, client)
        assert (response.status, data) == (200, b"ok")
        assert server.connections == 3

    run(scenario, answering(
        b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nbody",  # a body after a HEAD answer
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"
        b"HTTP/1.1 201 Created\r\ncontent-length: 3\r\n\r\nabc",  # an answer nobody asked for
        OK,
    ))


def test_a_reset_is_not_the_end_of_a_close_delimited_body() -> None:
    async def scenario(server: Scripted, client: Client) -> None:
        response = await client.request("GET", "127.0.0.2", server.port, "/", [], None, LIMITS)
        with pytest.raises(UpstreamFailed):
            await response.read()
        response.release()

    async def resets(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\npartial")
        await writer.drain()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    run(scenario, lambda server: resets)


def test_idle_connections_are_closed_after_the_keep_alive_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(upstream, "KEEPALIVE_SECONDS", 0.05)
    closed = asyncio.Event()

    async def scenario(server: Scripted, client: Client) -> None:
        await get(server, client)
        await asyncio.wait_for(closed.wait(), 5)  # the router let go of the idle connection
        assert client._idle == {}

    def script_for(server: Scripted) -> Script:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_request(reader)
            writer.write(OK)
            await reader.read()  # returns when the router closes its end
            closed.set()

        return script

    run(scenario, script_for)


@pytest.mark.parametrize(("size", "shutting_down"), [(2, False), (200_000, False), (2, True)],
                         ids=["small", "large", "small-after-close"])
def test_an_abandoned_request_keeps_its_connection_only_for_a_small_answer(
    size: int, shutting_down: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The requester gives up while the pod works: a small answer arriving within the
    grace is dropped and the connection pooled; a large one closes it, and so does any
    once the client has been closed (the router is stopping)."""
    monkeypatch.setattr(upstream, "KEEPALIVE_SECONDS", 60.0)  # no sweep closes it instead
    got, go, closed = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def scenario(server: Scripted, client: Client) -> None:
        task = asyncio.ensure_future(get(server, client))
        await asyncio.wait_for(got.wait(), 5)  # the request is at the pod
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        if shutting_down:
            await client.close()
        go.set()  # now the pod answers
        if size > DRAIN_LIMIT or shutting_down:
            await asyncio.wait_for(closed.wait(), 5)
            assert client._idle == {}
            return
        for _ in range(500):  # until the dropped answer has been read
            if client._idle:
                break
            await asyncio.sleep(0.01)
        assert (await get(server, client))[1] == b"ok"
        assert server.connections == 1

    def script_for(server: Scripted) -> Script:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await server.read_request(reader)
                got.set()
                await go.wait()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size
                             + b"x" * size)
                await server.read_request(reader)
                writer.write(OK)
                await writer.drain()
            finally:
                closed.set()

        return script

    run(scenario, script_for)


class _Unread:
    """A pod connection that only pauses and resumes: the answer is all fed at once."""

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def test_many_small_pieces_of_an_answer_pass_in_linear_time() -> None:
    """A pod's answer in tiny chunks: past `JOIN_LIMIT` buffered, pieces leave from the
    front one at a time, each in constant time. A read of 256 KiB holds up to some 29,000
    4-byte chunks; fed here as one read of 512 Ki of them, a store that moves the rest on
    every take (a list's `pop(0)`) takes well over ten seconds, a deque a fraction of one."""
    pieces = 512 * 1024

    async def main() -> float:
        response = Response(_Unread(), "GET", 10.0, 64 * 1024)  # type: ignore[arg-type]
        response.feed(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                      + b"4\r\nabcd\r\n" * pieces + b"0\r\n\r\n")
        started = time.perf_counter()
        size = 0
        async for data in response.chunks():
            size += len(data)
        assert size == 4 * pieces
        return time.perf_counter() - started

    assert asyncio.run(main()) < 2.0


class Piece(bytes):
    """A piece of body that says when it is freed (plain bytes take no weak reference,
    and neither does a subclass)."""

    freed = 0

    def __del__(self) -> None:
        Piece.freed += 1


def test_a_streamed_bodys_pieces_are_not_held_once_the_pod_has_them() -> None:
    """A body streams to a pod that has taken every piece so far; the client's next one is
    awaited (a trickled upload may take minutes). Nothing sent is held meanwhile: the
    first piece was kept by the request body, the last by the writer's loop and the
    body's stream: about 180 KiB a held upload (`python -m bench.held`, post-1m-held)."""
    pieces: asyncio.Queue[Message] = asyncio.Queue()
    awaited = asyncio.Event()  # the writer asks for a piece that has not come

    async def receive() -> Message:
        if pieces.empty():
            awaited.set()
        return await pieces.get()

    def reading(server: Scripted) -> Script:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(3000)
            writer.write(OK)
            await writer.drain()
        return script

    async def scenario(server: Scripted, client: Client) -> None:
        Piece.freed = 0
        await pieces.put({"type": "http.request", "body": Piece(b"b" * 1000),
                          "more_body": True})
        body = RequestBody(receive, None, Piece(b"a" * 1000), more=True, declared=3000)
        request = asyncio.ensure_future(client.request(
            "POST", "127.0.0.2", server.port, "/", [], body.data(), LIMITS, 3000))
        await awaited.wait()
        assert Piece.freed == 2
        await pieces.put({"type": "http.request", "body": b"c" * 1000, "more_body": False})
        response = await request
        assert (response.status, await response.read()) == (200, b"ok")
        response.release()
        assert body.size == 3000

    run(scenario, reading)


def test_a_body_the_retry_budget_runs_out_under_streams_whole_and_gives_its_share_back(
) -> None:
    """The budget is taken as a body arrives: when the next piece finds no room, the
    pieces kept so far lead a stream of the rest, and their share goes back at once."""
    budget = Budget(1500)
    pieces = [b"a" * 1000, b"b" * 1000, b"c" * 500]
    messages = [{"type": "http.request", "body": piece, "more_body": piece is not pieces[-1]}
                for piece in pieces]

    async def receive() -> Message:
        return messages.pop(0)

    async def main() -> None:
        body = await RequestBody.read(receive, 2500, 1024 * 1024, budget)
        assert not body.replayable
        assert budget.left == 1500
        data = body.data()
        assert not isinstance(data, bytes) and data is not None
        assert b"".join([piece async for piece in data]) == b"".join(pieces)
        assert body.size == 2500

    asyncio.run(main())


def test_a_pod_connections_send_buffer_is_fixed_not_autotuned() -> None:
    """Autotuned, a pod connection's send buffer grew to megabytes wherever the pod
    stopped reading an upload, charged to the router's memory: it is what
    `POD_SEND_BUFFER` asks of the kernel."""
    probe = socket.socket()
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, POD_SEND_BUFFER)
    fixed = probe.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)  # Linux doubles it
    probe.close()

    async def scenario(server: Scripted, client: Client) -> None:
        response = await client.request("GET", "127.0.0.2", server.port, "/", [], None, LIMITS)
        sock = response._connection._transport.get_extra_info("socket")  # type: ignore[union-attr]
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == fixed
        await response.read()
        response.release()

    run(scenario, answering(OK))
