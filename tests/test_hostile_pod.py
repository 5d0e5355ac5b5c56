"""What a pod can send the router's upstream client: raw pods answering with exact bytes.
Each hostile answer is a 502 at once (the proxy timeout is longer than the client's, so
a wait would fail the test), the pod's connection is closed, no error is logged, and the
router serves the next request."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Iterator

import httpx
import psutil
import pytest

from tests.conftest import StartRawPods, StartRouter, eventually, static_config
from tests.process import RouterProcess
from tests.rawclient import RawClient
from tests.rawpod import OK, WAIT, PodConnection, answering

INVALID = {"detail": "The backend sandbox sent an invalid HTTP response."}
TOO_BIG = {"detail": "The backend sandbox sent too large a header."}
FLOOD = 128 * 1024 * 1024
"""What a flooding pod tries to send: far more than the router may hold."""
HELD = 32 * 1024 * 1024
"""More than the router's limit plus both kernels' socket buffers on loopback."""
STATUS = b"HTTP/1.1 200 OK\r\n"


@dataclasses.dataclass
class Hostile:
    """The first connection gets `answer` (or the `flood` of pieces, until the router stops
    reading); later connections answer normally. Records how many bytes went out and
    whether the router closed the hostile connection."""

    answer: bytes = b""
    flood: bytes = b""
    sent: int = 0
    router_closed: bool = False
    done: threading.Event = dataclasses.field(default_factory=threading.Event)

    def __call__(self, connection: PodConnection) -> None:
        if connection.number > 1:
            answering(OK)(connection)
            return
        connection.read_request()
        if connection.send(self.answer):
            self.sent = len(self.answer)
        while self.flood and self.sent < FLOOD and connection.send(self.flood):
            self.sent += len(self.flood)
        self.router_closed = connection.closed_by_router()
        self.done.set()


@pytest.fixture
def no_errors_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """No error from any logger (asyncio's "Fatal error on transport" included)."""
    with caplog.at_level(logging.WARNING):
        yield
    records = caplog.get_records("call")  # `caplog.records` holds this teardown's only
    assert [r.getMessage() for r in records if r.levelno >= logging.ERROR] == []


def exchange(start_raw_pods: StartRawPods, start_router: StartRouter, hostile: Hostile,
             **options: int) -> tuple[int, object]:
    """One GET through a router whose only pod is `hostile`, then a second that must be
    answered; returns the first's status and JSON body."""
    pods = start_raw_pods(hostile)
    client = start_router(static_config(pods, proxy_timeout=120, **options))
    response = client.get("/")
    assert client.get("/").content == b"ok"  # the router still serves, on a new connection
    assert hostile.done.wait(WAIT) and hostile.router_closed
    assert pods[0].connections == 2
    return response.status_code, response.json()


@pytest.mark.usefixtures("no_errors_logged")
@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 600 Beyond\r\ncontent-length: 2\r\n\r\nok",
    b"HTTP/1.1 999 Beyond\r\ncontent-length: 2\r\n\r\nok",
    b"HTTP/1.1 099 Early\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
    b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: x\r\n\r\nraw",
    b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\nnot gzip, never ends",
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, identity\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntransfer-encoding: gzip\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok",
], ids=["600", "999", "099-interim", "101-upgrade", "101-bare", "te-gzip",
        "te-gzip-chunked", "te-chunked-identity", "te-two-headers", "te-and-length",
        "two-lengths"])
def test_a_malformed_answer_is_a_502_at_once(
    start_raw_pods: StartRawPods, start_router: StartRouter, answer: bytes
) -> None:
    """Out-of-range statuses, a 101 the router never asked for (it forwards no
    `Upgrade`), and any transfer coding but `chunked` alone: RFC 9112 6.3 would read the
    last until the pod closes, but the router cannot pass on a coding it does not decode
    under its own framing, so it refuses them, as nginx does."""
    assert exchange(start_raw_pods, start_router, Hostile(answer)) == (502, INVALID)


@pytest.mark.usefixtures("no_errors_logged")
@pytest.mark.parametrize(("answer", "flood"), [
    (STATUS, b"x-flood: " + b"a" * 1000 + b"\r\n"),  # header lines
    (STATUS + b"x-value: ", b"a" * 65536),  # one endless header value
    (STATUS[:-2] + b" ", b"a" * 65536),  # one endless reason phrase
    (b"", b"HTTP/1.1 100 Continue\r\n\r\n"),  # interim heads count towards the same limit
], ids=["lines", "one-value", "one-reason", "interim-heads"])
def test_a_flood_of_answer_head_is_refused_with_memory_flat(
    start_raw_pods: StartRawPods, start_router: StartRouter, answer: bytes, flood: bytes
) -> None:
    """A 128 MiB head at the default limit: refused after 64 KiB plus one read, so the pod
    is stopped long before it has sent what the router could have buffered."""
    hostile = Hostile(answer, flood)
    assert exchange(start_raw_pods, start_router, hostile) == (502, TOO_BIG)
    assert 64 * 1024 < hostile.sent < HELD


HEAD_LIMIT = 1024
BODY = b"content-length: 2\r\n"


def head_of(size: int) -> bytes:
    """A whole answer whose head (status line, headers, empty line) is `size` bytes."""
    filler = size - len(STATUS) - len(BODY) - len(b"x-fill: \r\n") - 2
    return STATUS + BODY + b"x-fill: " + b"f" * filler + b"\r\n\r\nok"


@pytest.mark.parametrize(("size", "status"), [(HEAD_LIMIT, 200), (HEAD_LIMIT + 1, 502)])
def test_the_answer_head_limit_is_exact(
    start_raw_pods: StartRawPods, start_router: StartRouter, size: int, status: int
) -> None:
    """`--max-response-head` counts the status line, every header line and the empty
    line; the body is not part of it, even when it comes in the same read."""
    pods = start_raw_pods(answering(head_of(size)))
    client = start_router(static_config(pods, max_response_head=HEAD_LIMIT))
    response = client.get("/")
    assert response.status_code == status
    if status == 200:
        assert response.content == b"ok"
    else:
        assert response.json() == TOO_BIG


def test_interim_heads_count_towards_the_limit(
    start_raw_pods: StartRawPods, start_router: StartRouter
) -> None:
    interim = b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n"
    count = HEAD_LIMIT // len(interim) + 1
    pods = start_raw_pods(answering(interim * count + OK))
    client = start_router(static_config(pods, max_response_head=HEAD_LIMIT))
    assert client.get("/").json() == TOO_BIG


CHUNKED = STATUS + b"transfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n"


@pytest.mark.usefixtures("no_errors_logged")
def test_a_flood_of_trailer_is_cut_with_memory_flat(
    start_raw_pods: StartRawPods, start_router: StartRouter
) -> None:
    """The head limit stopped at the head: an endless trailer value was buffered whole by
    the parser (300 MiB of it took the router from 33 to 331 MB). Now what the parser is
    fed between two pieces of body is bounded like a head; the answer, begun, is cut."""
    hostile = Hostile(CHUNKED + b"x-trailer: ", b"a" * 65536)
    pods = start_raw_pods(hostile)
    client = start_router(static_config(pods, proxy_timeout=120))
    with pytest.raises(httpx.RemoteProtocolError):  # the head was out: cut short
        client.get("/")
    assert client.get("/").content == b"ok"
    assert hostile.done.wait(WAIT) and hostile.router_closed
    assert 64 * 1024 < hostile.sent < HELD


def test_trailers_are_not_merged_into_the_head(
    start_raw_pods: StartRawPods, start_router: StartRouter
) -> None:
    """RFC 9110 6.5.1: they used to become headers when the whole answer came in one read."""
    pods = start_raw_pods(answering(CHUNKED + b"content-encoding: gzip\r\n\r\n"))
    client = start_router(static_config(pods))
    response = client.get("/")
    assert response.content == b"ok"
    assert "content-encoding" not in response.headers


def test_tiny_chunks_to_a_client_that_does_not_read_hold_little_memory(
    start_raw_pods: StartRawPods
) -> None:
    """Reading from the pod paused at 512 KiB of body, whatever the pieces: 1-byte chunks
    made each stalled request hold 512 Ki objects (10 such requests: 33 to 138 MB)."""
    stalled = threading.Semaphore(0)

    def tiny_chunks(connection: PodConnection) -> None:
        if connection.read_request() is not None:
            connection.send(CHUNKED[:-len(b"2\r\nok\r\n0\r\n")])
            while connection.send(b"1\r\na\r\n" * 10_000):  # until the router stops reading
                pass
        stalled.release()

    (pod,) = start_raw_pods(tiny_chunks)
    router = RouterProcess(["--pods", f"{pod.name}={pod.ip}:{pod.port}"])
    clients: list[RawClient] = []
    try:
        process = psutil.Process(router.process.pid)
        rss = process.memory_info().rss
        for _ in range(10):
            clients.append(RawClient(router.port, buffer=4096))
            clients[-1].send(b"GET / HTTP/1.1\r\nHost: r\r\n\r\n")  # and never reads
        for _ in clients:
            assert stalled.acquire(timeout=60)
        assert process.memory_info().rss - rss < 24 * 1024 * 1024
    finally:
        for client in clients:
            client.close()
        router.kill()


def test_hop_by_hop_headers_in_any_case_are_dropped(
    start_raw_pods: StartRawPods, start_router: StartRouter
) -> None:
    """Header names are case-insensitive: a pod's `Connection`, the headers it names, and
    the other hop-by-hop ones are dropped however they are spelt, and a `Content-Length`
    or `X-Request-ID` in capitals is still the one the router replaces or frames with."""
    pods = start_raw_pods(answering(
        b"HTTP/1.1 200 OK\r\nCONNECTION: X-Secret, keep-alive\r\nx-SECRET: 1\r\n"
        b"Keep-Alive: timeout=5\r\nUpgrade: h2c\r\nTrailer: X-T\r\nX-Request-Id: pod\r\n"
        b"Content-LENGTH: 2\r\nX-Kept: Yes\r\n\r\nok"))
    client = start_router(static_config(pods))
    response = client.get("/", headers={"x-request-id": "mine"})
    assert response.content == b"ok"
    assert response.headers["x-kept"] == "Yes"
    assert response.headers.get_list("x-request-id") == ["mine"]
    assert response.headers.get_list("content-length") == ["2"]
    for name in ("x-secret", "keep-alive", "upgrade", "trailer"):
        assert name not in response.headers
    assert response.headers.get("connection", "keep-alive") == "keep-alive"


@pytest.mark.parametrize("padding", [b" ", b"\t", b" \t "], ids=["space", "tab", "mixed"])
def test_a_padded_content_length_still_frames_the_answer(
    start_raw_pods: StartRawPods, start_router: StartRouter, caplog: pytest.LogCaptureFixture,
    padding: bytes
) -> None:
    """The parser keeps a value's trailing blanks (RFC 9110 5.5 optional whitespace): read
    as no length, an answer was taken as framed by the pod's close, so one cut short (3
    bytes of 10, then a FIN) was relayed as whole, and uvicorn raised ("Exception in ASGI
    application"). It is a pod failing mid-answer: the client's connection ends short,
    with the router's warning. A whole one keeps its pod connection."""

    def short(connection: PodConnection) -> None:
        if connection.read_request() is not None:
            connection.send(b"HTTP/1.1 200 OK\r\ncontent-length: 10" + padding + b"\r\n\r\nabc")

    pods = start_raw_pods(short, answering(b"HTTP/1.1 200 OK\r\ncontent-length: 2" + padding
                                           + b"\r\n\r\nok"))
    client = start_router(static_config(pods, proxy_timeout=120))
    with caplog.at_level(logging.WARNING):
        with pytest.raises(httpx.RemoteProtocolError):
            client.get("/", headers={"X-Sandbox-ID": pods[0].name})
        eventually(lambda: any("mid-response" in r.getMessage() for r in caplog.records))
        pinned = {"X-Sandbox-ID": pods[1].name}
        assert [client.get("/", headers=pinned).content for _ in range(2)] == [b"ok", b"ok"]
    assert pods[1].connections == 1
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


@pytest.mark.usefixtures("no_errors_logged")
@pytest.mark.parametrize(("lines", "status"), [(99, 200), (100, 502)])
def test_the_answer_header_line_limit_is_exact(
    start_raw_pods: StartRawPods, start_router: StartRouter, lines: int, status: int
) -> None:
    """100 lines, as Envoy and HAProxy allow: within the byte limit, 64 KiB of empty lines
    held 1.5 MB of the router's memory per answer in flight."""
    answer = (STATUS + b"x-line: \r\n" * lines + b"content-length: 2\r\n\r\nok")
    if status == 200:
        client = start_router(static_config(start_raw_pods(answering(answer))))
        assert client.get("/").content == b"ok"
    else:
        assert exchange(start_raw_pods, start_router, Hostile(answer)) == (status, TOO_BIG)


def test_a_busy_answer_trickled_holds_no_request(
    start_raw_pods: StartRawPods, start_router: StartRouter
) -> None:
    """A busy answer's body was read to its end before the next pod was tried, each read
    bounded by the proxy timeout but not the whole: a pod trickling its 503 held the
    request (answered nothing) for up to 64 Ki timeouts while another pod was free. Now
    the next pod is asked at once, and the trickling connection is closed."""
    stop = threading.Event()

    def trickle(connection: PodConnection) -> None:
        if connection.read_request() is not None and connection.send(
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 1000\r\n\r\n"):
            while connection.send(b"b") and not stop.wait(0.2):
                pass
            connection.pod.ended.set()

    busy, free = start_raw_pods(trickle, answering(OK))
    client = start_router(static_config([busy, free], proxy_timeout=1))
    try:
        # Two requests: one of them starts at the busy pod, wherever the counter starts.
        assert [client.get("/", timeout=WAIT).content for _ in range(2)] == [b"ok", b"ok"]
        assert len(busy.requests) == 1
        assert busy.ended.wait(WAIT)  # the router closed it: it stopped taking bytes
    finally:
        stop.set()
