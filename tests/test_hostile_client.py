"""What a hostile client can make the router hold: head size, header/body/send timeouts,
descriptors, memory, and strict request parsing. Raw-socket clients send each shape; every
test asserts the status the client saw, what the pod received, and that the router still
serves the next request."""

from __future__ import annotations

import dataclasses
import gc
import resource
import socket
import threading
import weakref
from collections.abc import Callable

import httpx
import psutil
import pytest

from router.config import StaticPod
from router.errors import ProxyError
from router.headers import Incoming, parse_pinned
from router.protocol import MAX_PIPELINED, HttpProtocol
from router.server import ServerThread
from tests import rawpod
from tests.conftest import StartPods, StartRawPods, StartRouter, eventually, static_config
from tests.process import RouterProcess
from tests.rawclient import Answer, RawClient, request
from tests.rawpod import RawPod
from tests.sandbox import Pod

LIMITS = {"header_timeout": 0.5, "body_timeout": 0.5, "send_timeout": 0.5}
HEAD = b"GET / HTTP/1.1\r\nHost: router\r\n"
MiB = 1024 * 1024


def port_of(client: httpx.Client) -> int:
    port = client.base_url.port
    assert port is not None
    return port


def serves_next(client: httpx.Client, pod: Pod, seen: int | None = None) -> None:
    """The router still answers a plain request, from the pod; with `seen`, the pod got
    exactly that many requests before it."""
    if seen is not None:
        assert pod.app.hits == seen
    before = pod.app.hits
    assert client.get("/", headers={"X-Sandbox-ID": pod.name}).status_code == 200
    assert pod.app.hits == before + 1


def refused(answer: Answer | None, status: int) -> Answer:
    assert answer is not None, "the connection closed without an answer"
    assert answer.status == status, answer
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["connection"] == "close"
    return answer


@pytest.fixture
def router(start_pods: StartPods, start_router: StartRouter) -> tuple[httpx.Client, Pod]:
    (pod,) = start_pods(1)
    return start_router(static_config([pod], **LIMITS)), pod


def over_raw_pod(start_pods: StartPods, start_router: StartRouter, raw: RawPod,
                 **limits: float) -> tuple[httpx.Client, Pod]:
    """A router over the raw pod (pinned as `raw-0`) and a real one (`pod-0`), with
    `LIMITS` (or `limits` in their place)."""
    (pod,) = start_pods(1)
    pods = (StaticPod(raw.name, raw.ip, raw.port), StaticPod(pod.name, pod.ip, pod.port))
    config = static_config([pod], **{**LIMITS, **limits})
    return start_router(dataclasses.replace(config, pods=pods)), pod


# -- request head size: 414 / 431 before the head is buffered --


@pytest.mark.parametrize(
    ("data", "status", "detail"),
    [
        (b"GET /" + b"a" * 60_000 + b" HTTP/1.1\r\nHost: r\r\n\r\n", 414,
         "The request line is too long."),
        (HEAD + b"x-big: " + b"a" * 40_000 + b"\r\n\r\n", 431,
         "The request headers are too large."),
        (HEAD + b"a: b\r\n" * 100 + b"\r\n", 431, "Too many request headers."),
    ],
    ids=["target-60KB", "header-40KB", "101-headers"],
)
def test_oversized_head_sent_at_once_is_refused(
    router: tuple[httpx.Client, Pod], data: bytes, status: int, detail: str
):
    client, pod = router
    raw = RawClient(port_of(client))
    raw.send(data)
    assert refused(raw.answer(), status).detail() == detail
    assert raw.closed()
    serves_next(client, pod, seen=0)


def test_oversized_head_pipelined_behind_a_request_never_reaches_the_pod(
    router: tuple[httpx.Client, Pod]
):
    client, pod = router
    raw = RawClient(port_of(client))
    raw.send(HEAD + b"\r\n" + b"GET /" + b"a" * 40_000 + b" HTTP/1.1\r\nHost: r\r\n\r\n")
    assert raw.closed()
    assert all(len(seen.raw_path) < 100 for seen in pod.app.seen)
    serves_next(client, pod)


@pytest.mark.parametrize(
    ("head", "filler", "status"),
    [
        (b"GET /", b"a" * 65536, 414),
        (HEAD + b"x-big: ", b"a" * 65536, 431),  # one 32 MiB header value
        (HEAD, b"a: b\r\n" * 10_000, 431),  # a million tiny headers
    ],
    ids=["endless-target", "32MiB-value", "1M-headers"],
)
def test_endless_head_is_refused_long_before_it_ends(
    router: tuple[httpx.Client, Pod], head: bytes, filler: bytes, status: int
):
    client, pod = router
    raw = RawClient(port_of(client))
    sent = raw.send_until_refused(head, filler, 32 * MiB)
    refused(raw.answer(), status)
    # Stopped by the router's close, not by running out: what was taken is the head limit
    # plus what the socket buffers held.
    assert sent < 16 * MiB
    serves_next(client, pod, seen=0)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_head_refused_as_it_arrives_is_answered_with_an_end_not_a_reset(
    start_pods: StartPods, start_router: StartRouter, loop: str
):
    """A head is refused at the limit while the rest of it is on its way: closed with
    that unread, the kernel sent a reset behind the 431, and a reset can destroy the
    answer before the client reads it. The router shuts its side behind the answer and
    drops what comes (at most `LINGER_LIMIT`) until the client is done."""
    pod = start_pods(1)[0]
    client = start_router(static_config([pod]), loop=loop)
    raw = RawClient(port_of(client))
    assert raw.send(HEAD + b"x-big: " + b"a" * (512 * 1024))  # all taken: none refused
    raw.sock.shutdown(socket.SHUT_WR)
    refused(raw.answer(), 431)
    try:
        assert raw.sock.recv(65536) == b""
    except ConnectionResetError:
        pytest.fail("the answer was followed by a reset, not an end")


# -- --header-timeout --


def test_connection_that_sends_nothing_is_closed_quietly(router: tuple[httpx.Client, Pod]):
    client, pod = router
    raw = RawClient(port_of(client))
    assert raw.answer() is None
    serves_next(client, pod)


def test_partial_head_gets_408(router: tuple[httpx.Client, Pod]):
    client, pod = router
    raw = RawClient(port_of(client))
    raw.send(HEAD)
    assert refused(raw.answer(), 408).detail() == "The request head did not arrive in time."
    assert raw.closed()
    serves_next(client, pod, seen=0)


def test_slowloris_head_gets_408_though_bytes_keep_coming(router: tuple[httpx.Client, Pod]):
    client, pod = router
    raw = RawClient(port_of(client))
    stop = threading.Event()

    def trickle() -> None:
        for byte in HEAD + b"x-slow: " + b"a" * 1000:
            if stop.is_set() or not raw.send(bytes([byte])):
                return
            stop.wait(0.05)

    thread = threading.Thread(target=trickle)
    thread.start()
    try:
        refused(raw.answer(), 408)
    finally:
        stop.set()
        thread.join()
    serves_next(client, pod, seen=0)


def test_next_head_is_timed_from_the_end_of_the_previous_answer(
    router: tuple[httpx.Client, Pod]
):
    client, pod = router
    raw = RawClient(port_of(client))
    raw.send(HEAD + b"\r\n")
    first = raw.answer()
    assert first is not None and first.status == 200
    raw.send(HEAD)  # half of a second request, on the kept-alive connection
    refused(raw.answer(), 408)
    serves_next(client, pod, seen=1)


# -- --timeout-keep-alive --


def test_kept_alive_connection_is_closed_once_idle_for_the_keep_alive_timeout(
    start_pods: StartPods, start_router: StartRouter
):
    """Between requests the keep-alive timeout applies (here far shorter than the head's),
    each request moving it on."""
    (pod,) = start_pods(1)
    client = start_router(static_config([pod], header_timeout=30.0, timeout_keep_alive=1.0))
    raw = RawClient(port_of(client))
    for _ in range(3):
        raw.send(HEAD + b"\r\n")
        answer = raw.answer()
        assert answer is not None and answer.status == 200
    assert raw.closed()  # by the router, well within the client's 10 s
    serves_next(client, pod, seen=3)


# -- --body-timeout --


def test_stalled_small_body_gets_408_and_the_pod_nothing(router: tuple[httpx.Client, Pod]):
    client, pod = router
    raw = RawClient(port_of(client))
    raw.send(b"POST / HTTP/1.1\r\nHost: r\r\nContent-Length: 100\r\n\r\n" + b"a" * 10)
    assert refused(raw.answer(), 408).detail() == "The request body did not arrive in time."
    assert raw.closed()
    serves_next(client, pod, seen=0)


@pytest.mark.parametrize(
    ("framing", "whole"),
    [
        (b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
         lambda body: body.endswith(b"0\r\n\r\n")),
        (b"Content-Length: 10485760\r\n\r\nhello", lambda body: len(body) >= 10485760),
    ],
    ids=["chunked", "content-length"],
)
def test_stalled_streamed_body_gets_408_and_the_pod_a_closed_connection(
    start_pods: StartPods, start_router: StartRouter, start_raw_pods: StartRawPods,
    framing: bytes, whole: Callable[[bytes], bool]
):
    silent = start_raw_pods(rawpod.silent)[0]
    client, pod = over_raw_pod(start_pods, start_router, silent)
    raw = RawClient(port_of(client))
    raw.send(b"POST /up HTTP/1.1\r\nHost: r\r\nX-Sandbox-ID: raw-0\r\n" + framing)
    refused(raw.answer(), 408)
    assert raw.closed()
    assert silent.ended.wait(10)
    (received,) = silent.raw_received()
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    assert head.startswith(b"POST /up HTTP/1.1\r\n") and b"hello" in body
    assert not whole(body)  # the pod never got a complete (silently short) request
    serves_next(client, pod)


def test_endless_request_trailer_is_refused_and_the_pod_gets_no_whole_request(
    start_pods: StartPods, start_router: StartRouter, start_raw_pods: StartRawPods
):
    """The head limit stopped at the head: a chunked body's endless trailer value was
    buffered whole by the parser (200 MiB took the router from 33 to 417 MB)."""
    silent = start_raw_pods(rawpod.silent)[0]
    client, pod = over_raw_pod(start_pods, start_router, silent)
    raw = RawClient(port_of(client))
    sent = raw.send_until_refused(
        b"POST /up HTTP/1.1\r\nHost: r\r\nX-Sandbox-ID: raw-0\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nx-trailer: ",
        b"a" * 65536, 128 * MiB)
    assert refused(raw.answer(), 431).detail() == "The request trailers are too large."
    assert sent < 16 * MiB
    assert silent.ended.wait(10)
    (received,) = silent.raw_received()
    assert not bytes(received).endswith(b"0\r\n\r\n")  # never a whole (shorter) request
    serves_next(client, pod)


def test_request_targets_in_other_forms(router: tuple[httpx.Client, Pod]):
    """An absolute-form target reaches the pod as its path and query (the authority in it
    routes nothing); `OPTIONS *` passes as it is; `CONNECT` is refused."""
    client, pod = router
    port = port_of(client)
    answer = request(port, b"GET http://other.example/x?q=1 HTTP/1.1\r\nHost: r\r\n\r\n")
    assert answer is not None and answer.status == 200
    answer = request(port, b"OPTIONS * HTTP/1.1\r\nHost: r\r\n\r\n")
    assert answer is not None and answer.status == 200
    answer = request(port, b"GET http://other.example?q=2 HTTP/1.1\r\nHost: r\r\n\r\n")
    assert answer is not None and answer.status == 200  # no path: "/" (it was a 400)
    absolute, star, no_path = pod.app.seen
    assert (absolute.method, absolute.raw_path, absolute.query) == ("GET", b"/x", b"q=1")
    assert (star.method, star.raw_path) == ("OPTIONS", b"*")
    assert (no_path.raw_path, no_path.query) == (b"/", b"q=2")
    connect = request(port, b"CONNECT other.example:443 HTTP/1.1\r\nHost: other.example:443"
                            b"\r\n\r\n")
    assert refused(connect, 400).detail() == "Invalid HTTP request received."
    assert len(pod.app.seen) == 3  # nothing of the CONNECT reached the pod


def test_request_trailers_neither_route_nor_reach_the_pod(router: tuple[httpx.Client, Pod]):
    """A trailer that came in the same read as the head used to be added to the request's
    headers (RFC 9110 6.5.1 says not to merge them): `X-Sandbox-ID` there pinned the
    request, past any proxy in front that vets only the head."""
    client, pod = router
    answer = request(port_of(client),
                     b"POST / HTTP/1.1\r\nHost: r\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"2\r\nok\r\n0\r\nX-Sandbox-ID: elsewhere\r\nX-Trailer: 1\r\n\r\n")
    assert answer is not None and answer.status == 200
    assert answer.headers["x-sandbox-id"] == pod.name  # a pool request, as its head said
    (seen,) = pod.app.seen
    assert seen.header("x-trailer") is None
    assert seen.body_bytes == 2


def test_body_time_the_router_spends_not_reading_is_not_the_clients(
    start_pods: StartPods, start_router: StartRouter, start_raw_pods: StartRawPods
):
    slow = start_raw_pods(rawpod.answering_late(3.0))[0]  # reads nothing for 3 body timeouts
    # 1 s, not LIMITS' 0.5: once the pod reads, the test's own client must not pause
    # that long, which a loaded machine made it do once.
    client, pod = over_raw_pod(start_pods, start_router, slow, body_timeout=1.0)
    body = b"a" * (32 * MiB)  # streamed (above --retry-body-limit), more than buffers hold
    response = client.post("/up", content=body, headers={"X-Sandbox-ID": "raw-0"})
    assert (response.status_code, response.text) == (200, "ok")
    (received,) = slow.raw_received()
    assert len(received) > len(body)  # all of it, after the head
    serves_next(client, pod)


# -- --send-timeout --


def test_client_that_stops_reading_loses_both_connections(
    start_pods: StartPods, start_router: StartRouter, start_raw_pods: StartRawPods
):
    endless = start_raw_pods(rawpod.streaming)[0]
    client, pod = over_raw_pod(start_pods, start_router, endless)
    raw = RawClient(port_of(client), buffer=4096)
    raw.send(HEAD + b"X-Sandbox-ID: raw-0\r\n\r\n")  # and never reads
    assert endless.ended.wait(10)  # the pod's connection was closed
    assert raw.closed()
    serves_next(client, pod)


# -- strict request parsing --


@pytest.mark.parametrize(
    ("data", "status", "detail"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", 400, "Missing Host header."),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "Repeated Host header."),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n", 400, "Repeated Host header."),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
         501, "Unsupported Transfer-Encoding: only chunked is."),
        (HEAD + b"X-Sandbox-ID: pod-0\r\nX-Sandbox-ID: pod-0\r\n\r\n", 400,
         "Repeated X-Sandbox-ID header."),
        (HEAD + b"X-Sandbox-ID: pod-0\r\nX-Sandbox-Namespace: default\r\n"
         b"x-sandbox-namespace: other\r\n\r\n", 400, "Repeated X-Sandbox-Namespace header."),
        (HEAD + b"X-Sandbox-ID: pod-0\r\nX-Sandbox-Port: +19402\r\n\r\n", 400,
         "Invalid port format."),
        (HEAD + b"X-Sandbox-ID: pod-0\r\nX-Sandbox-Port: 19_402\r\n\r\n", 400,
         "Invalid port format."),
        (HEAD + b"X-Sandbox-ID: pod-0\r\nX-Sandbox-Port: " + "٣".encode() + b"\r\n\r\n", 400,
         "Invalid port format."),
    ],
    ids=["no-host", "two-hosts", "same-host-twice", "gzip-chunked", "two-ids",
         "two-namespaces", "port-plus", "port-underscore", "port-arabic-digit"],
)
def test_malformed_request_is_refused_and_reaches_no_pod(
    router: tuple[httpx.Client, Pod], data: bytes, status: int, detail: str
):
    client, pod = router
    answer = request(port_of(client), data)
    assert answer is not None and answer.status == status
    assert answer.detail() == detail
    serves_next(client, pod, seen=0)


@pytest.mark.parametrize("line", [b"GET / HTTP/2.0\r\nHost: r\r\n", b"GET /\r\n"],
                         ids=["2.0", "0.9"])
def test_an_http_version_other_than_1_x_is_refused(router: tuple[httpx.Client, Pod],
                                                    line: bytes):
    """The parser takes them, and they were forwarded as HTTP/1.1 (0.9 needing no Host)."""
    client, pod = router
    answer = refused(request(port_of(client), line + b"\r\n"), 505)
    assert answer.detail() == "The HTTP version is not supported."
    serves_next(client, pod, seen=0)


def test_http_10_needs_no_host(router: tuple[httpx.Client, Pod]):
    client, pod = router
    answer = request(port_of(client), b"GET / HTTP/1.0\r\n\r\n")
    assert answer is not None and answer.status == 200
    assert pod.app.hits == 1


@pytest.mark.parametrize("text", [" 1", "1 ", "+1", "1_0", "٣", "0", "65536", "123456", "1e3"])
def test_port_must_be_plain_digits_in_range(text: str):
    incoming = Incoming(forward=[], request_id="r", content_length=None,
                        sandbox_id="pod-0", sandbox_port=text)
    with pytest.raises(ProxyError) as caught:
        parse_pinned(incoming, allow_loopback=False)
    assert (caught.value.status, caught.value.detail) == (400, "Invalid port format.")


def test_connection_token_never_strips_the_pin(
    start_pods: StartPods, start_router: StartRouter
):
    pods = start_pods(2)
    client = start_router(static_config(pods, **LIMITS))
    for _ in range(4):
        answer = request(port_of(client), HEAD + b"Connection: x-sandbox-id\r\n"
                         b"X-Sandbox-ID: pod-1\r\n\r\n")
        assert answer is not None and answer.status == 200
    assert [p.app.hits for p in pods] == [0, 4]


# -- what a closed connection leaves behind --


@pytest.mark.parametrize("shape", ["answered", "refused", "refused-upgrade", "left-pipelined"])
def test_closed_connection_is_freed_without_a_collection(
    router: tuple[httpx.Client, Pod], servers: list[ServerThread], shape: str,
    caplog: pytest.LogCaptureFixture,
):
    """However a connection ends (answered; its head refused, which the parser keeps as an
    error whose frames hold the protocol; refused by the app with an error that is a
    module constant, which kept the traceback of its last raise; the client gone with a
    request in flight and another queued behind it), nothing holds it in a reference
    cycle, and a request left unanswered because its client left is not logged as an app
    error."""
    client, pod = router
    connections = servers[-1].server.server_state.connections
    caplog.set_level("ERROR", logger="uvicorn.error")
    gc.collect()
    gc.disable()
    try:
        raw = RawClient(port_of(client))
        eventually(lambda: len(connections) == 1)
        (protocol,) = connections
        assert isinstance(protocol, HttpProtocol)
        freed = weakref.ref(protocol)
        del protocol
        if shape == "answered":
            raw.send(HEAD + b"\r\n")
            answer = raw.answer()
            assert answer is not None and answer.status == 200
        elif shape == "refused":
            raw.send(HEAD + b"a: b\r\n" * 200 + b"\r\n")
            refused(raw.answer(), 431)
        elif shape == "refused-upgrade":  # by the app, with an error that is a constant
            raw.send(HEAD + b"Connection: upgrade\r\nUpgrade: websocket\r\n"
                     b"Content-Length: 1\r\n\r\nx")
            refused(raw.answer(), 400)
        else:
            raw.send(b"GET /gate HTTP/1.1\r\nHost: router\r\n\r\n" + HEAD + b"\r\n")
            eventually(lambda: pod.app.hits == 1)  # the first is at the pod, the next queued
        raw.close()
        eventually(lambda: not connections)
        eventually(lambda: freed() is None)
    finally:
        gc.enable()
        pod.app.gate.set()
    serves_next(client, pod)
    assert "without starting response" not in caplog.text


def _hostile_clients(port: int) -> None:
    """Each shape above, several times; returns once the router has closed them all."""
    shapes = [(HEAD, b"a: b\r\n" * 10_000, 431), (HEAD + b"x-big: ", b"a" * 65536, 431),
              (b"GET /", b"a" * 65536, 414)]
    for _ in range(3):
        for head, filler, status in shapes:
            raw = RawClient(port)
            raw.send_until_refused(head, filler, 32 * MiB)
            refused(raw.answer(), status)
            raw.close()
    held = [RawClient(port) for _ in range(50)]
    for index, raw in enumerate(held):
        if index % 2:
            raw.send(HEAD)  # a partial head: 408; the others say nothing: closed
    for raw in held:
        assert raw.closed()
        raw.close()


def test_descriptors_and_memory_return_after_hostile_clients(start_pods: StartPods):
    (pod,) = start_pods(1)
    router = RouterProcess(["--pods", f"{pod.name}={pod.ip}:{pod.port}",
                            "--header-timeout", "0.5", "--body-timeout", "0.5"])
    try:
        process = psutil.Process(router.process.pid)
        with httpx.Client(base_url=router.url) as client:
            client.get("/")  # warm: the pod connection and the code paths are in place
            fds, rss = process.num_fds(), process.memory_info().rss
            _hostile_clients(router.port)
            assert client.get("/").status_code == 200
        eventually(lambda: process.num_fds() <= fds)
        # 1M headers once took the router from 33 to 154 MB and it kept it.
        assert process.memory_info().rss - rss < 24 * MiB
    finally:
        router.kill()


def _low_fd_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (128, 256))


def low_fd_router(pod: Pod, *flags: str) -> RouterProcess:
    """The router command over `pod` with `flags`, its descriptor limit lowered to 128 soft
    and 256 hard (the router raises the soft one)."""
    return RouterProcess(["--pods", f"{pod.name}={pod.ip}:{pod.port}", *flags],
                         preexec=_low_fd_limit)


def test_idle_clients_are_closed_so_a_new_one_is_served_when_descriptors_run_out(
    start_pods: StartPods
):
    (pod,) = start_pods(1)
    router = low_fd_router(pod, "--header-timeout", "0")
    idle: list[RawClient] = []
    try:
        process = psutil.Process(router.process.pid)
        assert process.rlimit(psutil.RLIMIT_NOFILE) == (256, 256)  # soft raised to hard
        idle = [RawClient(router.port) for _ in range(300)]
        for raw in idle[::2]:  # half begin a head, half say nothing; none is ever timed out
            raw.send(b"GET / HTTP/1.1\r\n")
        eventually(lambda: process.num_fds() >= 200)
        response = httpx.get(router.url + "/", timeout=10)
        assert response.status_code == 200
        assert pod.app.hits == 1
        assert any("file descriptors nearly exhausted" in line for line in router.lines)
    finally:
        for raw in idle:
            raw.close()
        router.kill()


def test_stalled_uploads_are_closed_too_when_descriptors_run_out(start_pods: StartPods):
    """A slow POST holds a descriptor as an idle client does: with only uploads stalled in
    their bodies, a new client used to get an empty reply."""
    (pod,) = start_pods(1)
    router = low_fd_router(pod, "--body-timeout", "0")
    stalled: list[RawClient] = []
    try:
        process = psutil.Process(router.process.pid)
        for _ in range(300):
            stalled.append(RawClient(router.port))
            stalled[-1].send(b"POST / HTTP/1.1\r\nHost: r\r\nContent-Length: 1000\r\n\r\nab")
        eventually(lambda: process.num_fds() >= 200)
        response = httpx.get(router.url + "/", timeout=10)
        assert response.status_code == 200
        assert pod.app.hits == 1  # no stalled upload reached the pod, even cut short
        answer = stalled[0].answer()  # the quietest (here: the oldest) went first
        assert answer is not None and answer.status == 408
        assert any("quiet in a request body" in line for line in router.lines)
    finally:
        for raw in stalled:
            raw.close()
        router.kill()


def test_a_malformed_request_pipelined_behind_one_in_flight_gets_no_answer_of_its_own(
    router: tuple[httpx.Client, Pod],
):
    """The pod runs the first request; the client used to get the parser's 400 as the
    first (only) answer on the connection, so it took the 400 for the request the pod ran.
    Now, as for every head refused behind an answer under way, the connection just ends."""
    client, pod = router
    raw = RawClient(port_of(client))
    raw.send(b"GET /slow?seconds=2 HTTP/1.1\r\nHost: r\r\n\r\n")
    eventually(lambda: pod.app.hits == 1)  # the pod has it, and answers in 2 s
    raw.send(b"GET / HTTP/1.1\r\nHost: r\r\nTransfer-Encoding: gzip\r\n\r\n")
    assert raw.answer() is None
    raw.close()
    serves_next(client, pod)


def test_a_malformed_request_is_answered_in_json(router: tuple[httpx.Client, Pod]):
    client, pod = router
    answer = refused(request(port_of(client), HEAD + b"X: a\x00b\r\n\r\n"), 400)
    assert answer.detail() == "Invalid HTTP request received."
    serves_next(client, pod, seen=0)


# -- what a body's framing and a pipeline can make the router hold --


@pytest.mark.parametrize("line", [b"1 \r\n", b"0x1\r\n", b"zz\r\n", b"1\n"],
                         ids=["blank", "hex-prefix", "not-hex", "bare-lf"])
def test_a_bad_chunk_line_in_the_first_read_is_answered_400(
    router: tuple[httpx.Client, Pod], line: bytes
):
    """Found after the head began the request: the connection used to close without an
    answer, logged as 499 (client gone)."""
    client, pod = router
    answer = request(port_of(client), b"POST / HTTP/1.1\r\nHost: r\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n" + line + b"a\r\n0\r\n\r\n")
    assert refused(answer, 400).detail() == "Invalid HTTP request received."
    serves_next(client, pod, seen=0)


def test_a_bad_chunk_line_mid_body_is_answered_400_and_the_pod_gets_no_whole_request(
    start_pods: StartPods, start_router: StartRouter, start_raw_pods: StartRawPods
):
    silent = start_raw_pods(rawpod.silent)[0]
    client, pod = over_raw_pod(start_pods, start_router, silent)
    raw = RawClient(port_of(client))
    raw.send(b"POST /up HTTP/1.1\r\nHost: r\r\nX-Sandbox-ID: raw-0\r\n"
             b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    eventually(lambda: any(b"hello" in seen for seen in silent.raw_received()))
    raw.send(b"zz\r\n")
    assert refused(raw.answer(), 400).detail() == "Invalid HTTP request received."
    assert raw.closed()
    assert silent.ended.wait(10)  # its connection closed: never a whole (shorter) request
    (received,) = silent.raw_received()
    assert not bytes(received).endswith(b"0\r\n\r\n")
    serves_next(client, pod)


@pytest.mark.parametrize(("queued", "answered"), [(MAX_PIPELINED, True), (100, False)])
def test_requests_pipelined_in_one_read_are_bounded(
    router: tuple[httpx.Client, Pod], queued: int, answered: bool
):
    """The parser takes a whole read at once: 256 KiB of tiny pipelined requests behind
    one in flight became some 9,000 queued ones (8 MB of the router's memory, seconds of
    parsing, for each such read). Up to `MAX_PIPELINED` wait their turn and are answered
    in order; beyond, the connection closes and no queued request reaches the pod."""
    client, pod = router
    raw = RawClient(port_of(client))
    raw.send(b"".join(b"GET /%d HTTP/1.1\r\nHost: r\r\n\r\n" % i for i in range(queued + 1)))
    if answered:
        statuses = [answer.status if (answer := raw.answer()) else None
                    for _ in range(queued + 1)]
        assert statuses == [200] * (queued + 1)
        assert [seen.raw_path for seen in pod.app.seen] == [
            b"/%d" % i for i in range(queued + 1)]
    else:
        assert raw.closed()
        assert pod.app.hits <= 1  # the first, begun before the rest was parsed
    raw.close()
    serves_next(client, pod)


def test_above_limit_concurrency_the_503_is_json(
    start_pods: StartPods, start_router: StartRouter
) -> None:
    """uvicorn's own answer was `text/plain` `Service Unavailable`."""
    pod = start_pods(1)[0]
    client = start_router(static_config([pod], limit_concurrency=2))
    held = RawClient(port_of(client))  # with the next one, the limit
    try:
        answer = request(port_of(client), HEAD + b"\r\n")
        assert refused(answer, 503).detail() == "The router is at its concurrency limit."
        assert answer.headers["retry-after"] == "1"
        assert pod.app.hits == 0
    finally:
        held.close()
