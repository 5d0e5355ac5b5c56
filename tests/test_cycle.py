"""router/cycle.py: `ProxyCycle` writes uvicorn's answer, byte for byte, and refuses what
uvicorn refuses: checked against uvicorn's own cycle on any headers and body messages."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from router.cycle import WHOLE_LIMIT, MessageEvent, ProxyCycle


class Transport:
    """What a cycle writes to, recorded (and its protocol's answer count)."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False
        self.answers = 0  # `on_response` calls: the protocol's "this answer is complete"
        self.pieces: list[bytes] = []  # the last `writelines`

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def writelines(self, pieces: list[bytes]) -> None:
        self.pieces = pieces
        self.written.append(b"".join(pieces))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def answered(self) -> None:
        self.answers += 1


def make(kind: type[RequestResponseCycle], method: str, keep_alive: bool,
         default_headers: list[tuple[bytes, bytes]]) -> tuple[RequestResponseCycle, Transport]:
    transport = Transport()
    cycle = kind(
        scope={"type": "http", "method": method, "headers": []},  # type: ignore[typeddict-item]
        transport=transport,  # type: ignore[arg-type]
        flow=FlowControl(transport),  # type: ignore[arg-type]
        logger=logging.getLogger("test"),
        access_logger=logging.getLogger("test"),
        access_log=False,
        default_headers=default_headers,
        message_event=asyncio.Event(),
        expect_100_continue=False,
        keep_alive=keep_alive,
        on_response=transport.answered,
    )
    return cycle, transport


def finish(coroutine: Coroutine[Any, Any, None]) -> None:
    """Run a `send` that must not wait (nothing is paused here)."""
    try:
        coroutine.send(None)
    except StopIteration:
        return
    raise AssertionError("send waited")


def outcome(kind: type[RequestResponseCycle], method: str, keep_alive: bool, status: int,
            defaults: list[tuple[bytes, bytes]], headers: list[tuple[bytes, bytes]],
            bodies: list[tuple[bytes, bool]]) -> list[object]:
    """The cycle's state after the head and after each body message (body, more), and what
    the client has got by the end of each body message; where a message is refused, why,
    and nothing after. What is written after the head alone is not compared: uvicorn
    writes the head at once, `ProxyCycle` with the first body message (the ASGI rule)."""
    cycle, transport = make(kind, method, keep_alive, defaults)
    seen: list[object] = []
    messages: list[dict[str, Any]] = [
        {"type": "http.response.start", "status": status, "headers": headers},
        *({"type": "http.response.body", "body": body, "more_body": more}
          for body, more in bodies),
    ]
    for message in messages:
        try:
            finish(cycle.send(message))  # type: ignore[arg-type]
        except (RuntimeError, ValueError) as exc:
            # A head refused for its names or values, or a content length that is not a
            # number, depending on which comes first: either way a refusal.
            seen.append("refused" if message["type"] == "http.response.start" else str(exc))
            break
        written = b"".join(transport.written) if message["type"] != "http.response.start" else None
        seen.append((written, transport.closed, transport.answers, cycle.keep_alive,
                     cycle.chunked_encoding, cycle.expected_content_length,
                     cycle.response_complete, cycle.message_event.is_set()))
    return seen


NAMES = st.one_of(
    st.sampled_from([b"content-length", b"Content-Length", b"transfer-encoding",
                     b"Transfer-Encoding", b"connection", b"Connection", b"content-type",
                     b"x-request-id", b"set-cookie"]),
    st.binary(max_size=12),
)
VALUES = st.one_of(
    st.sampled_from([b"0", b"5", b"10", b"chunked", b"Chunked", b"close", b"keep-alive",
                     b"Keep-Alive, Close", b"upgrade", b"text/plain; charset=utf-8"]),
    st.binary(max_size=12),
)


@settings(max_examples=800, deadline=None)
@given(
    method=st.sampled_from(["GET", "HEAD", "POST"]),
    keep_alive=st.booleans(),
    status=st.sampled_from([200, 204, 304, 404, 503, 599]),
    defaults=st.lists(st.tuples(NAMES, VALUES), max_size=2),
    headers=st.lists(st.tuples(NAMES, VALUES), max_size=6),
    bodies=st.lists(st.tuples(st.sampled_from([b"", b"hello", b"0123456789"]), st.booleans()),
                    max_size=3),
)
def test_the_answer_is_uvicorns(method: str, keep_alive: bool, status: int,
                                defaults: list[tuple[bytes, bytes]],
                                headers: list[tuple[bytes, bytes]],
                                bodies: list[tuple[bytes, bool]]) -> None:
    theirs = outcome(RequestResponseCycle, method, keep_alive, status, defaults, headers,
                     bodies)
    ours = outcome(ProxyCycle, method, keep_alive, status, defaults, headers, bodies)
    assert ours == theirs


@pytest.mark.parametrize("header", [
    (b"bad name", b"x"), (b"na\x00me", b"x"), (b"name:", b"x"),
    (b"name", b"a\r\nset-cookie: injected"), (b"name", b"a\nb"), (b"name", b"\x7f"),
    (b"name", b"\x00"),
])
def test_a_forbidden_byte_anywhere_refuses_the_head(header: tuple[bytes, bytes]) -> None:
    """Among valid headers, one forbidden byte in one name or value refuses the whole
    head, and nothing is written (a pod's header cannot split the client's answer)."""
    headers = [(b"content-type", b"text/plain"), header, (b"content-length", b"0")]
    cycle, transport = make(ProxyCycle, "GET", True, [])
    with pytest.raises(RuntimeError, match="Invalid HTTP header"):
        finish(cycle.send({"type": "http.response.start", "status": 200, "headers": headers}))
    assert transport.written == []


@settings(max_examples=300, deadline=None)
@given(
    method=st.sampled_from(["GET", "HEAD"]),
    keep_alive=st.booleans(),
    bodies=st.lists(st.tuples(st.sampled_from([b"", b"hello", b"0123456789"]), st.booleans()),
                    min_size=1, max_size=4),
    off_by=st.sampled_from([0, 0, 0, -1, 1]),
    close=st.booleans(),
)
def test_a_body_of_declared_length_is_uvicorns(method: str, keep_alive: bool,
                                               bodies: list[tuple[bytes, bool]], off_by: int,
                                               close: bool) -> None:
    """The messages a proxied answer of known length is: `Content-Length` as declared (or
    one byte off, which both refuse alike), the body in pieces, the last with more_body
    false (or not: the answer stays open)."""
    length = sum(len(body) for body, _ in bodies) + off_by
    headers = [(b"Content-Type", b"text/plain"), (b"Content-Length", b"%d" % max(length, 0))]
    if close:
        headers.append((b"Connection", b"close"))
    theirs = outcome(RequestResponseCycle, method, keep_alive, 200, [], headers, bodies)
    ours = outcome(ProxyCycle, method, keep_alive, 200, [], headers, bodies)
    assert ours == theirs


HEAD = {"type": "http.response.start", "status": 200,
        "headers": [(b"content-type", b"text/plain"), (b"content-length", b"5")]}


def test_a_whole_answer_goes_out_in_one_write_with_the_first_body_message() -> None:
    """Nothing is written for the head alone (the ASGI rule); head and body then go out in
    one write. Two writes would cost a system call, or a later turn of the loop when
    whatever the request touched has left the CPU's cache (#13)."""
    cycle, transport = make(ProxyCycle, "GET", True, [])
    finish(cycle.send(HEAD))  # type: ignore[arg-type]
    assert transport.written == []
    finish(cycle.send({"type": "http.response.body", "body": b"hello"}))
    assert transport.written == [b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n"
                                 b"content-length: 5\r\n\r\nhello"]
    assert cycle.response_complete and transport.answers == 1


def test_a_large_body_goes_out_beside_the_head_uncopied() -> None:
    body = b"x" * (WHOLE_LIMIT + 1)
    cycle, transport = make(ProxyCycle, "GET", True, [])
    head = {**HEAD, "headers": [(b"content-length", b"%d" % len(body))]}
    finish(cycle.send(head))  # type: ignore[arg-type]
    finish(cycle.send({"type": "http.response.body", "body": body}))
    assert len(transport.written) == 1 and transport.pieces[1] is body
    assert transport.pieces[0] == b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body)


@pytest.mark.parametrize("length", [b"5", None])
def test_an_empty_body_message_sends_the_head_of_a_stream_at_once(length: bytes | None) -> None:
    """How `router.proxy` has the head of a streamed answer go out before its content."""
    headers = [(b"content-length", length)] if length else []
    cycle, transport = make(ProxyCycle, "GET", True, [])
    finish(cycle.send({**HEAD, "headers": headers}))  # type: ignore[arg-type]
    finish(cycle.send({"type": "http.response.body", "body": b"", "more_body": True}))
    framing = b"content-length: 5" if length else b"transfer-encoding: chunked"
    assert transport.written == [b"HTTP/1.1 200 OK\r\n" + framing + b"\r\n\r\n"]
    assert not cycle.response_complete


async def _whole(scope: object, receive: object, send: Any) -> None:
    await send(HEAD)
    await send({"type": "http.response.body", "body": b"hello"})


async def _broken(scope: object, receive: object, send: Any) -> None:
    raise ValueError("the app failed")


@pytest.mark.parametrize("app", [_whole, _broken])
def test_the_task_leaves_the_servers_tasks_as_it_ends(app: Any) -> None:
    """`run_asgi` is uvicorn's (a failing app gets uvicorn's 500), and the task is out of
    the server's running requests by the time it is done, with no done callback (which
    cost a turn of the loop per request)."""
    async def scenario() -> tuple[bool, bytes]:
        cycle, transport = make(ProxyCycle, "GET", True, [])
        task = asyncio.get_running_loop().create_task(cycle.run_asgi(app))
        cycle.tasks, cycle.task = {task}, task
        await task
        assert not task._callbacks  # type: ignore[attr-defined]
        return cycle.tasks == set(), b"".join(transport.written)

    emptied, written = asyncio.run(scenario())
    assert emptied
    status = b"200 OK" if app is _whole else b"500 Internal Server Error"
    assert written.startswith(b"HTTP/1.1 " + status)


def test_the_message_event_wakes_its_waiters_as_asyncios_does() -> None:
    """What uvicorn's `receive` relies on: set before a wait returns at once; a set wakes
    every waiter; a wait given up (cancelled) does not stop the next one being woken."""
    async def scenario() -> None:
        event = MessageEvent()
        event.set()
        assert await event.wait() and event.is_set()
        event.clear()
        assert not event.is_set()
        given_up = asyncio.ensure_future(event.wait())
        await asyncio.sleep(0)
        given_up.cancel()
        with pytest.raises(asyncio.CancelledError):
            await given_up
        first, second = asyncio.ensure_future(event.wait()), asyncio.ensure_future(event.wait())
        await asyncio.sleep(0)
        assert not first.done()
        event.set()
        assert await asyncio.wait_for(asyncio.gather(first, second), 5) == [True, True]

    asyncio.run(scenario())
