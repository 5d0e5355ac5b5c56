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

from router.cycle import ProxyCycle


class Transport:
    """What a cycle writes to, recorded (and its protocol's answer count)."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False
        self.answers = 0  # `on_response` calls: the protocol's "this answer is complete"

    def write(self, data: bytes) -> None:
        self.written.append(data)

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
    """What the client gets after the head and after each body message (body, more), and
    the cycle's state each time; where a message is refused, why, and nothing after."""
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
        seen.append((b"".join(transport.written), transport.closed, transport.answers,
                     cycle.keep_alive,
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
