"""The replay rule (`router/replay.py`) against raw pods: a request a pod may have received
is never sent again, to it or to another pod; a pooled connection the pod had already
closed is replaced before anything is written; a chunked body is never replayed."""

from __future__ import annotations

import asyncio
import select
import threading
from collections.abc import Callable

import pytest

from router.connection import Connection
from router.errors import ConnectFailed, UpstreamFailed
from router.metrics import Metrics
from router.upstream import Client, Timeout
from tests.conftest import StartRawPods, StartRouter, scrape, static_config, value
from tests.loops import LOOPS, run_on
from tests.rawpod import BUSY, OK, WAIT, PodConnection, RawPod, answering

LIMITS = Timeout(read=WAIT, connect=WAIT)
FAILED = {"detail": "The backend sandbox connection failed."}
ATTEMPTS = "warmpool_router_upstream_attempts_total"
async def post(client: Client, pod: RawPod, body: bytes) -> tuple[int, bytes]:
    response = await client.request("POST", pod.ip, pod.port, "/", [], body, LIMITS)
    data = await response.read()
    response.release()
    return response.status, data


def resets_once_idle(closed: threading.Event, go: threading.Event, reset: bool) -> Callable[
        [PodConnection], None]:
    """The first connection answers one request, then, once `go` is set, is closed (FIN)
    or reset by the pod while idle; later connections answer every request."""
    serve = answering(OK)

    def behaviour(connection: PodConnection) -> None:
        if connection.number > 1:
            serve(connection)
            return
        connection.read_request()
        connection.send(OK)
        go.wait(WAIT)
        if reset:
            connection.reset()
        else:
            connection.sock.close()
        closed.set()

    return behaviour


@pytest.mark.parametrize("end", ["fin", "reset"])
@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_the_idle_close_race_takes_a_new_connection_and_sends_once(
    start_raw_pods: StartRawPods, loop_name: str, end: str
) -> None:
    """The transport race: the pod closes a pooled connection and its end is in the
    router's kernel, not yet reported by the event loop (held here), when the next
    request is written. It goes on a new connection to the same pod, once, whatever
    the method."""
    closed, go = threading.Event(), threading.Event()
    (pod,) = start_raw_pods(resets_once_idle(closed, go, reset=end == "reset"))

    async def main() -> None:
        client = Client()
        try:
            assert await post(client, pod, b"first") == (200, b"ok")
            (pooled,) = client._idle[(pod.ip, pod.port)]
            go.set()
            # Blocks the loop (no await) until the pod's end has reached the router's socket.
            assert closed.wait(WAIT)
            fd = pooled._transport.get_extra_info("socket").fileno()  # type: ignore[union-attr]
            assert select.select([fd], [], [], WAIT)[0] == [fd]
            assert not pooled.closed  # the loop has not seen it: the race is on
            assert await post(client, pod, b"second") == (200, b"ok")
        finally:
            await client.close()

    run_on(loop_name, main())
    assert [(r.body, r.connection) for r in pod.requests] == [(b"first", 1), (b"second", 2)]


class LosingClient(Client):
    """Each new connection is lost before the first write: aborted as a reset would
    (uvloop's `TCPTransport closed=True` race), and the loss reported too if `reported`."""

    def __init__(self, reported: bool) -> None:
        super().__init__()
        self.reported = reported

    async def _open(self, host: str, port: int) -> Connection:
        connection = await super()._open(host, port)
        connection._transport.abort()  # type: ignore[union-attr]
        if self.reported:
            await asyncio.sleep(0)  # one loop turn: connection_lost runs
            assert connection.closed
        return connection


@pytest.mark.parametrize("reported", [False, True], ids=["closing", "lost"])
@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_a_new_connection_gone_before_the_write_is_a_failed_connect(
    start_raw_pods: StartRawPods, loop_name: str, reported: bool
) -> None:
    """Nothing was written, so the pool may try the next pod: `ConnectFailed`, never an
    exception from the transport (a uvicorn 500 before)."""
    (pod,) = start_raw_pods(answering(OK))

    async def main() -> None:
        client = LosingClient(reported)
        try:
            with pytest.raises(ConnectFailed):
                await post(client, pod, b"never sent")
        finally:
            await client.close()

    run_on(loop_name, main())
    assert pod.requests == []


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_a_pooled_connection_closing_before_the_write_is_replaced(
    start_raw_pods: StartRawPods, loop_name: str
) -> None:
    (pod,) = start_raw_pods(answering(OK))

    async def main() -> None:
        client = Client()
        try:
            assert await post(client, pod, b"first") == (200, b"ok")
            (pooled,) = client._idle[(pod.ip, pod.port)]
            pooled._transport.abort()  # type: ignore[union-attr]  # loss not yet reported
            assert await post(client, pod, b"second") == (200, b"ok")
        finally:
            await client.close()

    run_on(loop_name, main())
    assert [(r.body, r.connection) for r in pod.requests] == [(b"first", 1), (b"second", 2)]


@pytest.mark.parametrize("method", ["GET", "PUT"])
@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_a_pooled_connection_lost_after_the_write_is_final(
    start_raw_pods: StartRawPods, loop_name: str, method: str
) -> None:
    """The pod reads the request on a reused connection and dies: it may have acted on
    it, so the request fails and is not sent again, idempotent or not."""

    def behaviour(connection: PodConnection) -> None:
        connection.read_request()
        connection.send(OK)
        connection.read_request()
        connection.reset()

    (pod,) = start_raw_pods(behaviour)

    async def main() -> None:
        client = Client()
        try:
            first = await client.request(method, pod.ip, pod.port, "/", [], b"x", LIMITS)
            assert await first.read() == b"ok"
            first.release()
            with pytest.raises(UpstreamFailed):
                await client.request(method, pod.ip, pod.port, "/", [], b"y", LIMITS)
        finally:
            await client.close()

    run_on(loop_name, main())
    assert [(r.body, r.connection) for r in pod.requests] == [(b"x", 1), (b"y", 1)]
    assert pod.connections == 1


def resets_on(path: bytes) -> Callable[[PodConnection], None]:
    """Answers every request on a connection, except one for `path`: read, then reset."""

    def behaviour(connection: PodConnection) -> None:
        while (request := connection.read_request()) is not None:
            if request.head.split(b" ")[1] == path:
                connection.reset()
                return
            connection.send(OK)

    return behaviour


def received_once(pods: list[RawPod], request_id: bytes) -> list[str]:
    """The pods that received the request, each id at most once per pod."""
    return [pod.name for pod in pods for seen in pod.received_ids() if seen == request_id]


@pytest.mark.parametrize("pooled", [False, True], ids=["new-connection", "pooled"])
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_a_pod_that_resets_after_receiving_is_never_followed_by_another(
    start_raw_pods: StartRawPods, start_router: StartRouter, metrics: Metrics,
    method: str, pooled: bool,
) -> None:
    pods = start_raw_pods(resets_on(b"/die"), resets_on(b"/die"))
    client = start_router(static_config(pods), metrics=metrics)
    if pooled:  # one idle connection to each pod, which /die then goes on
        assert [client.get("/").status_code for _ in pods] == [200, 200]
    response = client.request(method, "/die", content=b"body" if method == "POST" else None,
                              headers={"x-request-id": "the-one"})
    assert (response.status_code, response.json()) == (502, FAILED)
    assert len(received_once(pods, b"the-one")) == 1
    if pooled:  # and on the pooled connection: no new one was opened to resend it
        assert [pod.connections for pod in pods] == [1, 1]
    assert client.get("/").status_code == 200  # the router serves the next request
    samples = scrape(metrics.port)
    assert value(samples, ATTEMPTS, outcome="error") == 1
    assert value(samples, ATTEMPTS, outcome="connect_error") == 0


def dies_on_put(connection: PodConnection) -> None:
    """Answers GETs; a PUT is read, then the whole pod dies (listener closed, reset)."""
    while (request := connection.read_request()) is not None:
        if request.method == b"PUT":
            connection.pod.die()
            connection.reset()
            return
        connection.send(OK)


def test_a_put_held_by_a_pod_that_dies_is_a_502_never_all_busy(
    start_raw_pods: StartRawPods, start_router: StartRouter
) -> None:
    """Before the rule, the reused connection's loss read as an idle close, the resend's
    refused connect as "nothing sent", and the busy pod's 503 made it "all busy"."""
    first, second, busy = pods = start_raw_pods(dies_on_put, dies_on_put, answering(BUSY))
    client = start_router(static_config(pods))
    assert [client.get("/").status_code for _ in pods] == [200] * 3
    assert (first.connections, second.connections) == (1, 1)  # pooled, idle
    response = client.put("/", content=b"write", headers={"x-request-id": "the-put"})
    assert (response.status_code, response.json()) == (502, FAILED)
    assert len(received_once([first, second], b"the-put")) == 1  # the busy pod may have 503'd
    assert client.get("/").status_code == 200


@pytest.mark.parametrize("pieces", [[b"small"], [b"in ", b"three ", b"pieces"]],
                         ids=["one-read", "several-reads"])
def test_a_chunked_body_is_never_replayed(
    start_raw_pods: StartRawPods, start_router: StartRouter, pieces: list[bytes]
) -> None:
    """Whatever the timing of its reads, a body without Content-Length goes to one pod,
    chunked as it came, and that pod's 503 is relayed."""
    pods = start_raw_pods(answering(BUSY), answering(BUSY))
    client = start_router(static_config(pods))
    response = client.post("/", content=iter(pieces), headers={"x-request-id": "chunked"})
    assert (response.status_code, response.content) == (503, b"busy")  # the pod's own
    (name,) = received_once(pods, b"chunked")
    (seen,) = [r for pod in pods if pod.name == name for r in pod.requests]
    assert seen.header(b"transfer-encoding") == b"chunked"
    assert seen.body == b"".join(pieces)
