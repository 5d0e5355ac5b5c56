"""Large and long bodies stream through both ways with flat memory, and a client that
leaves mid-stream closes the upstream side too."""

from __future__ import annotations

import hashlib
import logging
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import psutil
import pytest

from router import connection
from router.observe import Exchange, NullObserver
from router.server import ServerThread
from tests.conftest import StartPods, StartRawPods, StartRouter, eventually, static_config
from tests.rawpod import OK, WAIT, PodConnection, answering
from tests.sandbox import pattern, pattern_sha256

BIG = 300 * 1024 * 1024
# The router, the pods and the client all run in this process, so its RSS growth bounds
# the router's own from above.
RSS_GROWTH_LIMIT = 60 * 1024 * 1024


@contextmanager
def peak_rss_growth() -> Iterator[list[int]]:
    """Sample this process's RSS every 20 ms; yields a one-item list filled with the peak
    growth over the starting RSS when the block ends."""
    process = psutil.Process()
    start = process.memory_info().rss
    peak = [start]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    result = [0]
    try:
        yield result
    finally:
        done.set()
        sampler.join(5)
        result[0] = peak[0] - start


def test_large_download_streams_with_flat_memory(
    start_pods: StartPods, start_router: StartRouter
):
    pods = start_pods(1)
    client = start_router(static_config(pods))
    digest = hashlib.sha256()
    with peak_rss_growth() as growth, client.stream("GET", f"/download?bytes={BIG}") as response:
        for chunk in response.iter_raw():
            digest.update(chunk)
    assert response.status_code == 200
    assert digest.hexdigest() == pattern_sha256(BIG)
    assert growth[0] < RSS_GROWTH_LIMIT, f"RSS grew {growth[0] / 2**20:.0f} MiB"


def test_large_upload_streams_with_flat_memory(start_pods: StartPods, start_router: StartRouter):
    pods = start_pods(1)
    client = start_router(static_config(pods))
    with peak_rss_growth() as growth:
        response = client.post(
            "/upload", content=pattern(BIG), headers={"Content-Length": str(BIG)}
        )
    assert response.json()["body_sha256"] == pattern_sha256(BIG)
    assert response.json()["body_bytes"] == BIG
    assert growth[0] < RSS_GROWTH_LIMIT, f"RSS grew {growth[0] / 2**20:.0f} MiB"


class Finished(NullObserver):
    """An observer that keeps every finished exchange."""

    def __init__(self) -> None:
        self.exchanges: list[Exchange] = []

    def request_finished(self, exchange: Exchange) -> None:
        self.exchanges.append(exchange)


def test_client_leaving_mid_stream_closes_the_upstream(
    start_pods: StartPods, start_router: StartRouter
):
    pods = start_pods(1)
    client = start_router(static_config(pods))
    with client.stream("GET", "/events") as response:
        assert next(response.iter_raw()) == b"data: hi\n\n"
    # Leaving the block closed the client's connection while the pod was silent.
    assert pods[0].app.events_closed.wait(10)
    assert client.get("/").status_code == 200


def test_client_leaving_before_the_pod_answers_closes_the_upstream(
    start_pods: StartPods, start_router: StartRouter
):
    pods = start_pods(1)
    finished = Finished()
    client = start_router(static_config(pods), observer=finished)  # type: ignore[arg-type]
    host, port = client.base_url.host, client.base_url.port
    with socket.create_connection((host, port)) as raw:
        raw.sendall(b"GET /hold HTTP/1.1\r\nHost: router\r\n\r\n")
        eventually(lambda: pods[0].app.hits == 1)  # the pod holds the request
        assert not pods[0].app.events_closed.is_set()
    # The client left before a single byte of answer: the pod's connection is dropped too,
    # rather than kept until --proxy-timeout.
    assert pods[0].app.events_closed.wait(10)
    assert client.get("/").status_code == 200
    eventually(lambda: any(e.path == "/hold" for e in finished.exchanges))
    assert [e.status for e in finished.exchanges if e.path == "/hold"] == [499]


def test_a_pod_failing_mid_answer_ends_the_client_connection_short(
    start_pods: StartPods, start_router: StartRouter, servers: list[ServerThread],
    caplog: pytest.LogCaptureFixture,
):
    pods = start_pods(1)
    finished = Finished()
    client = start_router(static_config(pods), observer=finished)  # type: ignore[arg-type]
    received = 0
    with caplog.at_level(logging.WARNING), pytest.raises(httpx.RemoteProtocolError), \
            client.stream("GET", "/broken?bytes=200000") as response:
        request_id = response.headers["x-request-id"]
        for chunk in response.iter_raw():
            received += len(chunk)
    assert received == 100000  # all the pod sent got out, then the connection ended
    # Pipelined behind another request, which the cut connection never serves.
    with socket.create_connection((client.base_url.host, client.base_url.port)) as raw:
        raw.settimeout(10)
        raw.sendall(b"GET /broken?bytes=200000 HTTP/1.1\r\nHost: r\r\n\r\n"
                    b"GET / HTTP/1.1\r\nHost: r\r\n\r\n")
        answer = b""
        while piece := raw.recv(65536):  # until the router closes the connection
            answer += piece
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and len(body) == 100000
    assert client.get("/").status_code == 200  # everyone else is still served
    router = next(s for s in servers if s.url == str(client.base_url).rstrip("/"))
    router.stop()  # its requests are all finished, their logs written
    cut = [(e.status, e.bytes_out) for e in finished.exchanges if e.path == "/broken"]
    assert cut == [(200, 100000)] * 2  # logged with the pod's status and what was sent
    messages = [(record.name, record.getMessage()) for record in caplog.records]
    assert ("uvicorn.error", "Exception in ASGI application\n") in messages  # the pod's
    assert any(name == "router.proxy" and "mid-response" in text and request_id in text
               for name, text in messages)
    # The router ended the answer itself: uvicorn has nothing to report about it.
    assert not any("without completing response" in text for _, text in messages)


def test_a_client_leaving_just_before_a_quick_answer_leaves_the_pod_connection_pooled(
    start_pods: StartPods, start_router: StartRouter, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(connection, "LEAVE_GRACE", 10.0)  # however slow this machine is
    pod = start_pods(1)[0]
    finished = Finished()
    client = start_router(static_config([pod]), observer=finished)  # type: ignore[arg-type]
    with socket.create_connection((client.base_url.host, client.base_url.port)) as raw:
        raw.sendall(b"GET /gate HTTP/1.1\r\nHost: router\r\n\r\n")
        eventually(lambda: pod.app.hits == 1)  # the pod holds the answer
    # The client has left: its request ends at once, with nothing sent anywhere.
    eventually(lambda: any(e.path == "/gate" for e in finished.exchanges))
    assert [(e.status, e.bytes_out) for e in finished.exchanges] == [(499, 0)]
    gate_port = pod.app.seen[0].peer_port
    pod.app.gate.set()  # the answer comes within the grace: dropped, its connection kept
    # Requests take the longest-idle pooled connection first, so /gate's comes round.
    eventually(lambda: client.get("/").status_code == 200
               and pod.app.seen[-1].peer_port == gate_port)
    assert len({seen.peer_port for seen in pod.app.seen}) <= 2  # at most one more opened


@pytest.mark.parametrize("framing", [b"transfer-encoding: chunked", b"content-length: 5"])
def test_a_streamed_answers_head_reaches_the_client_before_any_body(
    start_raw_pods: StartRawPods, start_router: StartRouter, framing: bytes
):
    """A pod that sends its head and then holds its body back (an event stream before its
    first event): the client has the head while the pod still holds the body. The router
    holds a head until the first body message (router/cycle.py); the proxy sends an
    empty one for a stream, without which this client would wait for the first event."""
    release = threading.Event()
    chunked = framing.startswith(b"transfer")

    def holding(pod: PodConnection) -> None:
        if pod.read_request() is not None:
            pod.send(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                     + framing + b"\r\n\r\n")
            release.wait(WAIT)
            pod.send(b"5\r\nhello\r\n0\r\n\r\n" if chunked else b"hello")
            pod.closed_by_router()

    pods = start_raw_pods(holding)
    client = start_router(static_config(pods))
    with socket.create_connection((client.base_url.host, client.base_url.port)) as raw:
        raw.settimeout(WAIT)
        raw.sendall(b"GET /events HTTP/1.1\r\nHost: r\r\n\r\n")
        received = b""
        while b"\r\n\r\n" not in received:
            piece = raw.recv(65536)
            assert piece, "the router closed before the head"
            received += piece
        head, _, body = received.partition(b"\r\n\r\n")
        assert not release.is_set() and body == b""  # the pod holds its body still
        assert head.startswith(b"HTTP/1.1 200") and framing in head.lower()
        release.set()
        end = b"0\r\n\r\n" if chunked else b"hello"
        while not body.endswith(end):
            piece = raw.recv(65536)
            assert piece, "the router closed before the body"
            body += piece
    assert body == (b"5\r\nhello\r\n0\r\n\r\n" if chunked else b"hello")


def test_an_upload_longer_than_the_proxy_timeout_is_no_504(
    start_raw_pods: StartRawPods, start_router: StartRouter
):
    """`--proxy-timeout` bounds each wait for the pod: a pod taking every piece of a
    streamed body as it comes is not silent, however long the upload (nginx starts its read
    timeout once the request is sent). The wait for its answer began when the head was
    written and never moved, so an upload of more than a timeout was a 504, and cooled
    the pod down. Paced: eight pieces a quarter of a timeout apart."""
    pods = start_raw_pods(answering(OK))
    client = start_router(static_config(pods, proxy_timeout=1))
    pause = threading.Event()

    def slow_body() -> Iterator[bytes]:
        for _ in range(8):
            yield b"x" * 100
            pause.wait(0.25)

    response = client.post("/", content=slow_body())  # chunked: streamed
    assert (response.status_code, response.content) == (200, b"ok")
    assert pods[0].requests[0].body == b"x" * 800
