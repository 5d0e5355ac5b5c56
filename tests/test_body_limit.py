"""`--max-body-size`: a body declared above it is refused before any pod is asked and
before it is read; one that grows past it while streaming never reaches a pod whole.
Raw-socket clients send each shape and raw pods record what reached them."""

from __future__ import annotations

import select
import socket
import time

import httpx
import pytest

from tests import rawpod
from tests.conftest import StartRawPods, StartRouter, eventually, static_config
from tests.rawclient import Answer, RawClient
from tests.rawpod import PodConnection, RawPod

LIMIT = 100_000
TOO_LARGE = "The request body is too large."
PIN = b"X-Sandbox-ID: raw-0\r\n"
MiB = 1024 * 1024


def over(pod: RawPod, start_router: StartRouter, limit: int = LIMIT) -> int:
    """A router over the one raw pod (the pool, or pinned as `raw-0`); its port."""
    client: httpx.Client = start_router(static_config([pod], max_body_size=limit))
    port = client.base_url.port
    assert port is not None
    return port


def post(target: bytes, framing: bytes, pin: bytes = b"") -> bytes:
    return b"POST " + target + b" HTTP/1.1\r\nHost: r\r\n" + pin + framing


def chunked(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def too_large(answer: Answer | None) -> None:
    assert answer is not None, "the connection closed without an answer"
    assert (answer.status, answer.detail()) == (413, TOO_LARGE)
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["connection"] == "close"


def short_of_the_limit(received: bytes) -> None:
    """What a pod got of a body sent as `x`s then `y`s, chunked: no byte past the limit
    (the pieces up to it may have passed), and never the last chunk, so never a whole
    (shorter) request."""
    body = received.partition(b"\r\n\r\n")[2]
    assert body.count(b"x") + body.count(b"y") <= LIMIT
    assert not body.endswith(b"0\r\n\r\n")


def answering_at_once(connection: PodConnection) -> None:
    """Answers as soon as the head came (a chunked answer that never ends), then records
    what comes until the router closes the connection (`RawPod.ended`)."""
    if connection.read_head() is not None:
        connection.send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        rawpod.silent(connection)


@pytest.mark.parametrize("pin", [b"", PIN], ids=["pool", "pinned"])
def test_a_declared_length_above_the_limit_is_refused_before_the_body_or_a_pod(
    start_router: StartRouter, start_raw_pods: StartRawPods, pin: bytes
):
    pod = start_raw_pods(rawpod.answering(rawpod.OK))[0]
    raw = RawClient(over(pod, start_router))
    # The client sends its body regardless, as most do: more than every buffer holds.
    raw.send_until_refused(post(b"/up", b"Content-Length: %d\r\n\r\n" % (LIMIT + 1), pin),
                           b"a" * 65536, 64 * MiB)
    too_large(raw.answer())
    assert raw.closed()
    assert pod.connections == 0  # no pod was asked


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_body_exactly_at_the_limit_passes_whole(
    start_router: StartRouter, start_raw_pods: StartRawPods, framing: str
):
    pod = start_raw_pods(rawpod.answering(rawpod.OK))[0]
    raw = RawClient(over(pod, start_router))
    body = bytes(range(256)) * (LIMIT // 256) + b"z" * (LIMIT % 256)
    if framing == "chunked":
        half = LIMIT // 2
        raw.send(post(b"/up", b"Transfer-Encoding: chunked\r\n\r\n") + chunked(body[:half])
                 + chunked(body[half:]) + b"0\r\n\r\n")
    else:
        raw.send(post(b"/up", b"Content-Length: %d\r\n\r\n" % LIMIT) + body)
    answer = raw.answer()
    assert answer is not None and (answer.status, answer.body) == (200, b"ok")
    (seen,) = pod.requests
    assert seen.body == body


@pytest.mark.parametrize("pin", [b"", PIN], ids=["pool", "pinned"])
def test_a_chunked_body_growing_past_the_limit_is_413_and_the_pod_gets_no_whole_request(
    start_router: StartRouter, start_raw_pods: StartRawPods, pin: bytes
):
    silent = start_raw_pods(rawpod.silent)[0]
    raw = RawClient(over(silent, start_router))
    raw.send(post(b"/up", b"Transfer-Encoding: chunked\r\n\r\n", pin)
             + chunked(b"x" * (LIMIT - 10)))
    eventually(lambda: sum(map(len, silent.raw_received())) > LIMIT - 10)  # mid-body at the pod
    # Past the limit, then the body's end and a request pipelined behind it.
    raw.send(chunked(b"y" * 11) + b"0\r\n\r\nGET /next HTTP/1.1\r\nHost: r\r\n\r\n")
    too_large(raw.answer())
    assert raw.closed()
    assert silent.ended.wait(10)  # its connection closed mid-body
    (received,) = silent.raw_received()  # and no other: the pipelined GET went nowhere
    short_of_the_limit(received)


def test_a_body_growing_past_the_limit_under_an_answer_ends_the_connection(
    start_router: StartRouter, start_raw_pods: StartRawPods
):
    """The pod answered before the body ended: nothing can be said any more, so the
    client's connection ends short of the answer, and the pod's is closed mid-body."""
    endless = start_raw_pods(answering_at_once)[0]
    raw = RawClient(over(endless, start_router))
    raw.send(post(b"/up", b"Transfer-Encoding: chunked\r\n\r\n") + chunked(b"x" * 1000))
    answer = raw.answer()
    assert answer is not None and answer.status == 200  # its head; the body streams
    raw.send(chunked(b"y" * LIMIT))
    assert raw.closed()
    assert endless.ended.wait(10)
    (received,) = endless.raw_received()
    short_of_the_limit(received)


def test_a_request_above_the_limit_pipelined_behind_another_is_answered_in_turn(
    start_router: StartRouter, start_raw_pods: StartRawPods
):
    pod = start_raw_pods(rawpod.answering(rawpod.OK))[0]
    raw = RawClient(over(pod, start_router))
    raw.send(b"GET /first HTTP/1.1\r\nHost: r\r\n\r\n"
             + post(b"/up", b"Content-Length: %d\r\n\r\n" % (LIMIT + 1)) + b"a" * 1000)
    answer = raw.answer()
    assert answer is not None and answer.status == 200
    too_large(raw.answer())
    assert raw.closed()
    assert [seen.head.split(b" ")[1] for seen in pod.requests] == [b"/first"]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_0_is_no_limit(start_router: StartRouter, start_raw_pods: StartRawPods, framing: str):
    pod = start_raw_pods(rawpod.answering(rawpod.OK))[0]
    raw = RawClient(over(pod, start_router, limit=0))
    body = b"a" * (4 * MiB)
    if framing == "chunked":
        raw.send(post(b"/up", b"Transfer-Encoding: chunked\r\n\r\n") + chunked(body)
                 + b"0\r\n\r\n")
    else:
        raw.send(post(b"/up", b"Content-Length: %d\r\n\r\n" % len(body)) + body)
    answer = raw.answer()
    assert answer is not None and answer.status == 200
    assert len(pod.requests[0].body) == len(body)


@pytest.mark.parametrize(
    ("framing", "limit", "status"),
    [(b"Content-Length: %d\r\n\r\n" % (LIMIT + MiB), LIMIT, 413),
     (b"Transfer-Encoding: gzip, chunked\r\n\r\n", 0, 501)],
    ids=["413", "501"],
)
def test_an_answer_before_the_body_is_followed_by_an_end_not_a_reset(
    start_router: StartRouter, start_raw_pods: StartRawPods, framing: bytes, limit: int,
    status: int,
):
    """Any answer given before the body is read closes the connection with the body still
    arriving: closing with it unread would send a reset behind the answer, which a client
    may lose the answer to. The router shuts its side behind the answer and drops what
    comes instead. (Here the client sent half a MiB the router left unread, then reads.)"""
    pod = start_raw_pods(rawpod.answering(rawpod.OK))[0]
    raw = RawClient(over(pod, start_router, limit))
    assert raw.send(post(b"/up", framing) + chunked(b"a" * (MiB // 2)))
    answer = raw.answer()
    assert answer is not None and answer.status == status
    try:
        assert raw.sock.recv(65536) == b""
    except ConnectionResetError:
        pytest.fail("the answer was followed by a reset, not an end")
    assert pod.connections == 0


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_an_answer_before_the_body_lingers_though_nothing_waits_unread(
    start_router: StartRouter, start_raw_pods: StartRawPods, loop: str
):
    """The router had read all that came of the body when it answered (on a network, the
    rest is still in flight): what the client sends next must not meet a closed socket,
    whose reset can destroy the answer before it is read."""
    pod = start_raw_pods(rawpod.answering(rawpod.OK))[0]
    client: httpx.Client = start_router(static_config([pod], max_body_size=LIMIT), loop=loop)
    assert client.base_url.port is not None
    raw = RawClient(client.base_url.port)
    raw.send(post(b"/up", b"Content-Length: %d\r\n\r\n" % (LIMIT + 1)) + b"a" * 1000)
    assert select.select([raw.sock], [], [], 10)[0], "no answer"  # it came, unread
    raw.send(b"a" * 1000)  # the rest of the body, on its way when the answer came
    too_large(raw.answer())
    try:
        raw.sock.shutdown(socket.SHUT_WR)  # the client is done: the router closes too
        assert raw.sock.recv(65536) == b""
    except OSError:  # ECONNRESET, or ENOTCONN once a reset has ended the connection
        pytest.fail("the answer was followed by a reset, not an end")


def test_a_client_cannot_hold_a_lingering_connection_by_sending_on(
    start_router: StartRouter, start_raw_pods: StartRawPods
):
    """Lingering waits for the client's end, but not past `LINGER`: a client that goes on
    sending after its answer, a little every 50 ms and never closing, is closed anyway
    (its sends then fail), every byte it sent read and dropped, none of it parsed as a
    request."""
    pod = start_raw_pods(rawpod.answering(rawpod.OK))[0]
    raw = RawClient(over(pod, start_router))
    raw.send(post(b"/up", b"Content-Length: %d\r\n\r\n" % (LIMIT + 1)) + b"a" * 1000)
    too_large(raw.answer())
    assert raw.sock.recv(65536) == b""  # the router's side is shut behind the answer
    sends = 0
    while sends < 400 and raw.send(b"GET / HTTP/1.1\r\nHost: r\r\n\r\n"):  # 20 s at most
        sends += 1
        time.sleep(0.05)  # the client's pace, not a wait for the router
    assert sends < 400, "the router never closed a connection its client kept sending on"
    assert pod.connections == 0
