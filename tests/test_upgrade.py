"""Upgrades through both routes: a real WebSocket client (aiohttp's) and a real WebSocket
sandbox (`tests/wspod.py`), and raw sockets for an upgrade that is not a WebSocket."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import json
import logging
import resource
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import aiohttp
import psutil
import pytest

from router import limits
from router.clients import client_address, client_key
from router.config import Config
from router.connection import Connection
from router.errors import ProxyError
from router.logs import access_line
from router.metrics import Metrics
from router.observe import Exchange
from router.protocol import EARLY_LIMIT, ClientUpgrade, HttpProtocol
from router.server import bind
from router.tunnel import Tunnel, Tunnels
from tests.conftest import StartRawPods, StartRouter, eventually, scrape, static_config, value
from tests.process import RouterProcess
from tests.rawclient import Answer, RawClient
from tests.rawpod import BUSY, OK, WAIT, PodConnection, answering
from tests.wspod import CLOSE_ME, SUBPROTOCOL, WsPod

StartWsPods = Callable[[int], list[WsPod]]
WsRouter = Callable[..., tuple[WsPod, str]]
T = TypeVar("T")
BIG = 8 * 1024 * 1024
ROUTES = ["pool", "pinned"]


@pytest.fixture
def start_ws_pods() -> Iterator[StartWsPods]:
    """`start_ws_pods(3)`: WebSocket pods pod-0.. on 127.0.0.2.., on one shared port."""
    running: list[WsPod] = []

    def start(count: int) -> list[WsPod]:
        port = 0
        for index in range(count):
            pod = WsPod(f"pod-{index}", f"127.0.0.{2 + index}", port).start()
            port = pod.port
            running.append(pod)
        return running[-count:]

    yield start
    for pod in running:
        pod.stop()


class Recorder:
    """An observer that keeps the exchanges it is told of."""

    def __init__(self) -> None:
        self.opened: list[Exchange] = []
        self.finished: list[Exchange] = []

    def request_started(self, route: str) -> None:
        pass

    def attempt(self, outcome: str) -> None:
        pass

    def request_finished(self, exchange: Exchange) -> None:
        self.finished.append(exchange)

    def upgraded(self, exchange: Exchange) -> None:
        self.opened.append(exchange)

    def pod_list_refreshed(self, outcome: str) -> None:
        pass


def config(pods: list[WsPod], **options: Any) -> Config:
    options.setdefault("shutdown_timeout", 2)  # a test that fails leaves no 30 s drain
    return static_config(pods, **options)  # type: ignore[arg-type]


@pytest.fixture
def ws_router(start_ws_pods: StartWsPods, start_router: StartRouter) -> WsRouter:
    """`pod, url = ws_router(**options)`: one WebSocket pod and the URL of a router over it
    (`observer=` goes to the router, the rest to its config)."""

    def start(observer: Any = None, **options: Any) -> tuple[WsPod, str]:
        pod = start_ws_pods(1)[0]
        return pod, url_of(start_router(config([pod], **options), observer=observer))

    return start


def run(make: Callable[[], Awaitable[T]], timeout: float = 60) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await make()

    return asyncio.run(bounded())


def url_of(client: Any) -> str:
    return str(client.base_url).rstrip("/")


@asynccontextmanager
async def websocket(
    url: str, headers: dict[str, str] | None = None, protocols: tuple[str, ...] = (),
    path: str = "/ws", source: str | None = None,
) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    """A WebSocket client, from `source` (another loopback address: another client)."""
    connector = aiohttp.TCPConnector(local_addr=(source, 0) if source else None)
    async with aiohttp.ClientSession(connector=connector) as session, session.ws_connect(
        url + path, headers=headers, protocols=protocols, max_msg_size=0, autoping=False
    ) as ws:
        yield ws


async def echo(ws: aiohttp.ClientWebSocketResponse, data: str | bytes) -> None:
    if isinstance(data, str):
        await ws.send_str(data)
    else:
        await ws.send_bytes(data)
    message = await ws.receive()
    assert message.data == data


def pinned_headers(pod: WsPod) -> dict[str, str]:
    return {"X-Sandbox-ID": pod.name, "X-Sandbox-Namespace": "default"}


@pytest.mark.parametrize("route", ROUTES)
def test_messages_subprotocol_and_close_codes_pass_through(route: str, ws_router: WsRouter) -> None:
    pod, url = ws_router()
    extra = pinned_headers(pod) if route == "pinned" else {}
    headers = {**extra, "Origin": "https://ide.example", "X-Sandbox-Tag": "x"}
    big_up, big_down = bytes(range(256)) * (BIG // 256), b"\x07" * BIG

    async def session() -> tuple[Any, int | None]:
        async with websocket(url, headers, (SUBPROTOCOL, "other")) as ws:
            assert ws.protocol == SUBPROTOCOL
            answer = ws._response.headers.copy()  # the 101 as the client got it
            await echo(ws, "hello")
            await echo(ws, big_up)
            await echo(ws, big_down)
            await ws.send_str(CLOSE_ME)
            closing = await ws.receive()
            assert closing.type == aiohttp.WSMsgType.CLOSE
            return answer, ws.close_code

    answer, code = run(session)
    assert code == 4001  # the sandbox's close code reached the client
    if route == "pool":
        assert answer["X-Sandbox-ID"] == pod.name
        assert answer["X-Sandbox-Namespace"] == "default"
    assert answer["Upgrade"].lower() == "websocket"
    seen = pod.handshakes[0]
    assert "Origin" not in seen  # dropped on upgrades (the Host is the router's)
    assert not any(name.lower().startswith("x-sandbox-") for name in seen)
    assert seen["Upgrade"] == "websocket"
    assert seen["X-Forwarded-For"] == "127.0.0.1"
    eventually(lambda: pod.ended == 1)


@pytest.mark.parametrize("route", ROUTES)
def test_a_close_code_from_the_client_reaches_the_sandbox(route: str, ws_router: WsRouter) -> None:
    pod, url = ws_router()
    headers = pinned_headers(pod) if route == "pinned" else {}

    async def session() -> None:
        async with websocket(url, headers) as ws:
            await echo(ws, "hi")
            await ws.close(code=4002, message=b"done")

    run(session)
    eventually(lambda: pod.client_close_codes == [4002])


def test_origin_is_kept_on_ordinary_requests(
    start_raw_pods: StartRawPods, start_router: StartRouter
) -> None:
    pod = start_raw_pods(answering(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"))[0]
    client = start_router(static_config([pod]))
    assert client.get("/", headers={"Origin": "https://ide.example"}).status_code == 200
    assert pod.requests[0].header(b"origin") == b"https://ide.example"


def test_pool_handshakes_go_round_robin_and_skip_a_busy_pod(
    start_ws_pods: StartWsPods, start_router: StartRouter
) -> None:
    pods = start_ws_pods(3)
    url = url_of(start_router(config(pods)))

    async def handshakes(count: int) -> list[str]:
        names = []
        for _ in range(count):
            async with websocket(url) as ws:
                names.append(ws._response.headers["X-Sandbox-ID"])
                await echo(ws, "hi")
        return names

    assert sorted(run(lambda: handshakes(6))) == ["pod-0", "pod-0", "pod-1", "pod-1",
                                                  "pod-2", "pod-2"]
    pods[1].busy = True
    served = run(lambda: handshakes(4))
    assert "pod-1" not in served and len(served) == 4
    assert len(pods[1].handshakes) == 2  # none since it was busy


def test_a_pinned_busy_pods_503_is_relayed(
    start_ws_pods: StartWsPods, start_router: StartRouter
) -> None:
    pods = start_ws_pods(2)
    pods[0].busy = True
    client = start_router(config(pods, upgrade_max_per_client=1))

    async def handshake() -> None:
        async with websocket(url_of(client), pinned_headers(pods[0])):
            pass

    for _ in range(2):  # the second is not a 429: a failed handshake gives its slot back
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            run(handshake)
        assert refused.value.status == 503
    assert pods[1].handshakes == []  # a pinned answer is final
    assert client.get("/").status_code != 101  # the router serves the next request


@pytest.mark.parametrize("timeout", ["proxy_timeout", "header_timeout", "body_timeout",
                                     "send_timeout", "timeout_keep_alive"])
def test_silence_longer_than_an_http_timeout_does_not_cut(
    timeout: str, ws_router: WsRouter
) -> None:
    """Only the tunnel's own timers apply to it: none of the client protocol's (header,
    body, send, keep-alive) nor the wait for the pod's answer."""
    _, url = ws_router(**{timeout: 0.2})

    async def session() -> None:
        async with websocket(url) as ws:
            await asyncio.sleep(0.6)  # time passing is the point, not a synchronisation
            await echo(ws, "still here")

    run(session)


@pytest.mark.parametrize("limit", ["upgrade_idle_timeout", "upgrade_max_lifetime"])
def test_idle_timeout_and_lifetime_close_both_ends(limit: str, ws_router: WsRouter) -> None:
    recorder = Recorder()
    pod, url = ws_router(observer=recorder, **{limit: 0.3})

    async def session() -> aiohttp.WSMsgType:
        async with websocket(url) as ws:
            await echo(ws, "hi")
            return (await ws.receive()).type  # nothing more is sent: the router ends it

    assert run(session) in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
    eventually(lambda: pod.ended == 1)
    eventually(lambda: len(recorder.finished) == 1)
    assert recorder.finished[0].status == 101


def test_traffic_keeps_an_upgraded_connection_past_the_idle_timeout(ws_router: WsRouter) -> None:
    pod, url = ws_router(upgrade_idle_timeout=1.0)

    async def session() -> None:
        async with websocket(url) as ws:
            for _ in range(10):  # 2 s in all, never 1 s quiet
                await echo(ws, "tick")
                await asyncio.sleep(0.2)
            assert pod.ended == 0

    run(session)
    eventually(lambda: pod.client_close_codes == [1000])  # ended by the client's close


def test_per_client_limit_counts_the_peer_without_a_trusted_proxy(
    start_ws_pods: StartWsPods, start_router: StartRouter
) -> None:
    pod = start_ws_pods(1)[0]
    recorder = Recorder()
    url = url_of(start_router(config([pod], upgrade_max_per_client=2), observer=recorder))

    async def third(forwarded: list[str]) -> int | None:
        async with websocket(url, {"X-Forwarded-For": forwarded[0]}), \
                websocket(url, {"X-Forwarded-For": forwarded[1]}):
            try:
                async with websocket(url, {"X-Forwarded-For": forwarded[2]}):
                    return None
            except aiohttp.WSServerHandshakeError as exc:
                return exc.status

    # X-Forwarded-For is not trusted: all three are the one peer, 127.0.0.1.
    assert run(lambda: third(["10.0.0.1", "10.0.0.2", "10.0.0.3"])) == 429
    assert len(pod.handshakes) == 2  # the third never reached the pod
    eventually(lambda: len(recorder.finished) == 3)  # each gives its slot back as it ends
    assert run(lambda: third(["a", "b", "c"])) == 429  # two slots again, not none
    assert len(pod.handshakes) == 4


def test_per_client_limit_reads_x_forwarded_for_from_a_trusted_proxy(
    start_ws_pods: StartWsPods, start_router: StartRouter
) -> None:
    pod = start_ws_pods(1)[0]
    trusted = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("192.0.2.0/24"))
    recorder = Recorder()
    url = url_of(start_router(config([pod], upgrade_max_per_client=1,
                                     trusted_proxy_cidrs=trusted), observer=recorder))
    # The right-most untrusted hop is the client: 10.0.0.1 behind 192.0.2.7 twice.
    assert run(lambda: second(url, "6.6.6.6, 10.0.0.1, 192.0.2.7",
                              "10.0.0.1, 192.0.2.7")) == 429
    eventually(lambda: len(recorder.finished) == 2)  # 10.0.0.1's slot is free again
    assert run(lambda: second(url, "10.0.0.1", "10.0.0.2")) is None  # two clients


async def second(url: str, first: str, other: str) -> int | None:
    """The status refusing a handshake forwarded for `other` while one forwarded for
    `first` is open; None if it went through."""
    async with websocket(url, {"X-Forwarded-For": first}):
        try:
            async with websocket(url, {"X-Forwarded-For": other}):
                return None
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status


@pytest.mark.parametrize(("first", "other", "status"), [
    ("2001:db8::1", "2001:DB8:0:0::1", 429),  # one address, two spellings
    ("2001:db8::1", "2001:db8::2", None),  # one /64 (the pods of a node): two clients
    ("::ffff:192.0.2.9", "192.0.2.9", 429),  # IPv4-mapped: the IPv4 client
    ("192.0.2.9:50001", "192.0.2.9:50002", 429),  # a proxy writing the client's port too
    ("192.0.2.9", "192.0.2.10", None),  # IPv4: each address
])
def test_per_client_limit_counts_an_address_whatever_its_spelling(
    first: str, other: str, status: int | None, start_ws_pods: StartWsPods,
    start_router: StartRouter
) -> None:
    """Through a real router: the loopback peer is a trusted proxy, so the clients are
    the addresses it forwards for (the test machine has no IPv6 loopback beyond ::1)."""
    pod = start_ws_pods(1)[0]
    trusted = (ipaddress.ip_network("127.0.0.0/8"),)
    url = url_of(start_router(config([pod], upgrade_max_per_client=1,
                                     trusted_proxy_cidrs=trusted)))
    assert run(lambda: second(url, first, other)) == status
    assert len(pod.handshakes) == (1 if status else 2)  # a refused one reached no pod


@pytest.mark.parametrize(("address", "key"), [
    ("192.0.2.1", "192.0.2.1"),
    ("::ffff:192.0.2.1", "192.0.2.1"),
    ("2001:DB8:1:2:0:0:0:6", "2001:db8:1:2::6"),
    ("::1", "::1"),
    ("fe80::1%eth0", "fe80::1%eth0"),
    ("203.0.113.7:50001", "203.0.113.7"),  # a proxy that writes the client's port too
    ("[2001:db8::1]:443", "2001:db8::1"),
    ("unknown", "unknown"),  # an X-Forwarded-For hop that is no address: as written
])
def test_a_client_is_its_address_in_one_spelling(address: str, key: str) -> None:
    assert client_key(address) == key


def test_tunnels_count_each_client_and_all_clients_together() -> None:
    tunnels = Tunnels(max_per_client=2, max_total=3)
    tunnels.reserve("a")
    tunnels.reserve("a")
    assert _refusal(tunnels, "a") == (429, "Too many upgraded connections from this client.")
    tunnels.reserve("b")
    assert _refusal(tunnels, "c") == (503, "Too many upgraded connections.")
    assert _refusal(tunnels, "a") == (429, "Too many upgraded connections from this client.")
    tunnels.release("a")
    tunnels.reserve("c")  # the slot "a" gave back
    unlimited = Tunnels(max_per_client=0, max_total=0)  # 0: no limit, as every 0 limit
    for _ in range(1000):
        unlimited.reserve("a")


def _refusal(tunnels: Tunnels, client: str) -> tuple[int, str]:
    with pytest.raises(ProxyError) as refused:
        tunnels.reserve(client)
    return refused.value.status, refused.value.detail


@pytest.mark.parametrize(("soft", "default"), [
    (1024, 256), (20_000, 5_000), (40, limits.UPGRADE_MAX_FLOOR),
    (resource.RLIM_INFINITY, limits.UNBOUNDED_TABLE // 4),
])
def test_upgrade_max_defaults_to_a_quarter_of_the_descriptor_limit(
    soft: int, default: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two descriptors a tunnel: upgraded connections can hold half the table at most."""
    monkeypatch.setattr(limits, "_soft_limit", lambda: soft)
    assert limits.upgrade_max_default() == default


def test_upgrade_max_is_the_derived_default_unless_given(
    start_ws_pods: StartWsPods, start_router: StartRouter
) -> None:
    pod = start_ws_pods(1)[0]
    derived = start_router(config([pod])).app._proxy.tunnels  # type: ignore[attr-defined]
    given = start_router(config([pod], upgrade_max=0)).app._proxy.tunnels  # type: ignore[attr-defined]
    assert derived._max_total == limits.upgrade_max_default()
    assert given._max_total == 0


def test_upgrade_max_bounds_the_upgraded_connections_of_all_clients_together(
    start_ws_pods: StartWsPods, start_router: StartRouter
) -> None:
    """Four clients (four loopback addresses), each under its own limit: the process holds
    three upgraded connections, the fourth client's handshake is a 503 that reaches no
    pod, and a tunnel that ends frees its slot. Tunnels leave `--limit-concurrency`'s
    count, and every pod has its own address: this is the bound on them all."""
    pod = start_ws_pods(1)[0]
    recorder = Recorder()
    client = start_router(config([pod], upgrade_max=3, upgrade_max_per_client=2,
                                 limit_concurrency=2), observer=recorder)
    url, port = url_of(client), client.base_url.port or 0

    async def session() -> None:
        async with contextlib.AsyncExitStack() as held:
            sockets = [await held.enter_async_context(websocket(url, source=f"127.0.0.{20 + i}"))
                       for i in range(3)]
            for ws in sockets:
                await echo(ws, "hi")
            refused = await asyncio.to_thread(_handshake, port, "127.0.0.23")
            assert refused.status == 503
            assert refused.detail() == "Too many upgraded connections."
            assert refused.headers["retry-after"] == "1"
            assert len(pod.handshakes) == 3  # the refused one never reached the pod
            await sockets[0].close()
            await asyncio.to_thread(eventually, lambda: len(recorder.finished) == 2)
            async with websocket(url, source="127.0.0.23") as ws:  # the freed slot
                await echo(ws, "in")

    run(session)
    assert len(pod.handshakes) == 4
    assert [exchange.status for exchange in recorder.finished[:2]] == [503, 101]


def test_a_handshake_under_way_holds_its_slot_of_upgrade_max(
    start_raw_pods: StartRawPods, start_router: StartRouter
) -> None:
    """Counted from the handshake, as the per-client limit counts: else clients could
    start any number of handshakes that all become tunnels."""
    switch = threading.Event()

    def switching_when_told(connection: PodConnection) -> None:
        if connection.read_request() is not None and switch.wait(WAIT):
            connection.send(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n"
                            b"Upgrade: websocket\r\n\r\n")

    pod = start_raw_pods(switching_when_told)[0]
    port = start_router(static_config([pod], upgrade_max=1)).base_url.port or 0
    first = RawClient(port, source="127.0.0.20")
    try:
        first.send(HANDSHAKE)
        eventually(lambda: len(pod.requests) == 1)  # at the pod, not answered yet
        refused = _handshake(port, "127.0.0.21")
        assert refused.status == 503
        switch.set()
        switched = first.answer()
        assert switched is not None and switched.status == 101
    finally:
        switch.set()
        first.close()
    assert len(pod.requests) == 1


class HeldHandshake:
    """A router (`options` for its config) over a raw pod that never answers a handshake
    and notes when the router closes its connection (`closed`); `recorder` sees each
    request end."""

    def __init__(self, start_raw_pods: StartRawPods, start_router: StartRouter,
                 **options: Any) -> None:
        self.closed = threading.Event()

        def never_switching(connection: PodConnection) -> None:
            if connection.read_request() is not None and connection.closed_by_router():
                self.closed.set()

        self.pod = start_raw_pods(never_switching)[0]
        self.recorder = Recorder()
        client = start_router(static_config([self.pod], **options), observer=self.recorder)
        self.tunnels = client.app._proxy.tunnels  # type: ignore[attr-defined]
        self.port = client.base_url.port or 0

    def assert_ended_as_the_client_left(self) -> None:
        """The pod's connection closed, the request logged 499, its upgrade slot free."""
        assert self.closed.wait(WAIT)
        eventually(lambda: [exchange.status for exchange in self.recorder.finished] == [499])
        assert self.tunnels._reserved == 0


def test_a_client_leaving_during_the_handshake_frees_its_slots_and_the_pod_at_once(
    start_raw_pods: StartRawPods, start_router: StartRouter
) -> None:
    """The pod holds back its 101 and the client leaves. Reading was paused during a
    handshake, so the client's FIN went unseen: the request held its upgrade slots and
    the pod's connection until `--proxy-timeout` (180 s), and was then logged 504. A
    never-answering pod could so fill `--upgrade-max` for clients that hold nothing."""
    held = HeldHandshake(start_raw_pods, start_router, upgrade_max=1)
    leaving = RawClient(held.port, source="127.0.0.20")
    leaving.send(HANDSHAKE)
    eventually(lambda: len(held.pod.requests) == 1)  # at the pod, not answered
    leaving.close()
    held.assert_ended_as_the_client_left()


def test_a_websocket_client_sending_more_than_early_limit_before_the_101_is_closed(
    start_raw_pods: StartRawPods, start_router: StartRouter
) -> None:
    """A WebSocket client must wait for the 101 before it sends (RFC 6455 4.1). Past
    `EARLY_LIMIT`, reading would pause and its leaving go unseen until --proxy-timeout:
    the connection closes instead, and its request ends (499), its slot free."""
    held = HeldHandshake(start_raw_pods, start_router)
    eager = RawClient(held.port)
    try:
        eager.send(HANDSHAKE)
        eventually(lambda: len(held.pod.requests) == 1)
        eager.send_until_refused(b"", b"x" * 4096, 8 * EARLY_LIMIT)
        held.assert_ended_as_the_client_left()
    finally:
        eager.close()


HANDSHAKE = (b"GET /ws HTTP/1.1\r\nHost: sandbox\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
             b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")


def _handshake(port: int, source: str) -> Answer:
    """The answer to a WebSocket handshake from `source` that is not switched (the
    connection closes after it)."""
    raw = RawClient(port, source=source)
    try:
        raw.send(HANDSHAKE)
        answer = raw.answer()
        assert answer is not None
        assert raw.closed()
        return answer
    finally:
        raw.close()


def test_upgraded_connections_do_not_use_up_limit_concurrency(
    start_ws_pods: StartWsPods, start_router: StartRouter
) -> None:
    pod = start_ws_pods(1)[0]
    client = start_router(config([pod], limit_concurrency=2))
    url = url_of(client)

    async def three_open() -> None:
        async with websocket(url) as a, websocket(url) as b, websocket(url) as c:
            for ws in (a, b, c):
                await echo(ws, "hi")
            answer = await asyncio.to_thread(client.get, "/")
            assert answer.text == "plain"  # not 503: tunnels are not uvicorn's count

    run(three_open)


def test_a_pod_dying_mid_connection_closes_the_client(
    start_ws_pods: StartWsPods, start_router: StartRouter
) -> None:
    pod = start_ws_pods(1)[0]
    client = start_router(config([pod]))

    async def session() -> aiohttp.WSMsgType:
        async with websocket(url_of(client)) as ws:
            await echo(ws, "hi")
            pod.die()
            return (await ws.receive()).type

    assert run(session) in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
    assert client.get("/").status_code != 101  # the router goes on serving


def raw_upgrade(port: int, protocol: bytes, extra: bytes = b"", behind: bytes = b""
                ) -> tuple[socket.socket, bytes]:
    """A handshake over a raw socket: the socket and what came back up to the head's end
    (plus any bytes the pod sent with it). `extra`: more headers; `behind`: bytes sent
    right behind the head, in the same write."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"GET /raw HTTP/1.1\r\nHost: sandbox\r\nConnection: Upgrade\r\n"
                 b"Upgrade: " + protocol + b"\r\n" + extra + b"\r\n" + behind)
    received = b""
    while b"\r\n\r\n" not in received:
        piece = sock.recv(65536)
        assert piece, received
        received += piece
    return sock, received


def test_the_client_leaving_closes_the_pods_connection(
    start_ws_pods: StartWsPods, start_router: StartRouter
) -> None:
    pod = start_ws_pods(1)[0]
    client = start_router(config([pod]))
    sock, answer = raw_upgrade(client.base_url.port or 0, b"websocket",
                               b"Sec-WebSocket-Version: 13\r\n"
                               b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n")
    assert answer.startswith(b"HTTP/1.1 101 ")
    assert b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in answer  # the sandbox's accept, relayed
    sock.close()  # no close frame: the client just goes
    eventually(lambda: pod.ended == 1)


@pytest.mark.parametrize("ends", ["client", "pod"])
def test_an_ended_tunnel_is_freed_without_a_collection(
    ends: str, start_ws_pods: StartWsPods, start_router: StartRouter
) -> None:
    """Both connections, the tunnel and the client connection's protocol go by reference
    counting when the tunnel ends, whichever end ends it: the protocol, which the socket no
    longer reaches, would otherwise wait, with its request, for the collector."""
    pod = start_ws_pods(1)[0]
    client = start_router(config([pod]))
    gc.collect()
    gc.disable()
    try:
        sock, answer = raw_upgrade(client.base_url.port or 0, b"websocket",
                                   b"Sec-WebSocket-Version: 13\r\n"
                                   b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n")
        assert answer.startswith(b"HTTP/1.1 101 ")
        if ends == "client":
            sock.close()
        else:  # a masked close frame: the pod answers it and closes its end
            sock.sendall(b"\x88\x82\x00\x00\x00\x00\x03\xe8")
        eventually(lambda: pod.ended == 1)
        sock.close()
        eventually(lambda: not _held())
    finally:
        gc.enable()


def _held() -> list[object]:
    """What of an upgraded connection is still alive (a client protocol whose connection
    ended has no parser)."""
    return [thing for thing in gc.get_objects()
            if isinstance(thing, (Tunnel, ClientUpgrade, Connection))
            or (isinstance(thing, HttpProtocol) and thing.parser is None)]


def echo_upper(connection: PodConnection) -> None:
    """A raw pod speaking protocol `foo`: 101, a greeting, then each read back in capitals."""
    request = connection.read_request()
    if request is None:
        return
    connection.send(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n"
                    b"Upgrade: foo\r\n\r\nwelcome\n")
    while data := connection._recv():
        connection.send(data.upper())


def test_an_upgrade_that_is_not_websocket_is_tunnelled(
    start_raw_pods: StartRawPods, start_router: StartRouter
) -> None:
    pod = start_raw_pods(echo_upper)[0]
    client = start_router(static_config([pod]))
    sock, answer = raw_upgrade(client.base_url.port or 0, b"foo", b"Origin: http://evil\r\n")
    with sock:
        head, _, early = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
        assert b"\r\nupgrade: foo" in head.lower()
        assert b"\r\nx-sandbox-id: raw-0" in head.lower()
        while not early.endswith(b"\n"):
            early += sock.recv(100)
        assert early == b"welcome\n"  # sent by the pod with its 101
        sock.sendall(b"shout")
        assert sock.recv(100) == b"SHOUT"
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(100) == b""  # the client's end closed the pod's, then its own
    request = pod.requests[0]
    assert request.header(b"upgrade") == b"foo"
    assert request.header(b"connection") == b"upgrade"
    assert request.header(b"origin") is None
    # The same pod's 101 to a request that did not ask for an upgrade: refused.
    assert client.get("/").status_code == 502


def test_bytes_sent_behind_the_handshake_reach_the_pod_after_its_101(
    start_raw_pods: StartRawPods, start_router: StartRouter
) -> None:
    """A client that does not wait for the 101: what it sent behind its head, read with
    the head, is the tunnel's first bytes (they used to be dropped)."""
    pod = start_raw_pods(echo_upper)[0]
    client = start_router(static_config([pod]))
    sock, answer = raw_upgrade(client.base_url.port or 0, b"foo", b"", b"early bytes")
    with sock:
        _, _, after = answer.partition(b"\r\n\r\n")
        while len(after) < len(b"welcome\nEARLY BYTES"):
            piece = sock.recv(100)
            assert piece, after
            after += piece
        assert after == b"welcome\nEARLY BYTES"


def test_bytes_behind_the_handshake_reach_only_the_pod_that_switched(
    start_raw_pods: StartRawPods, start_router: StartRouter
) -> None:
    """A busy pod's 503 sends the handshake on to the next pod: what the client sent
    behind its head goes to the pod that answered 101, once, and never to the busy one."""
    def switching(connection: PodConnection) -> None:
        if _upgraded(connection):
            connection.closed_by_router()  # recording what comes, until the tunnel ends

    busy, switched = start_raw_pods(answering(BUSY), switching)
    client = start_router(static_config([busy, switched]))
    for early in (b"EARLY-1", b"EARLY-2"):  # one of the two starts at the busy pod
        sock, answer = raw_upgrade(client.base_url.port or 0, b"foo", b"", early)
        with sock:
            assert answer.startswith(b"HTTP/1.1 101 ")
            sock.shutdown(socket.SHUT_WR)
            assert _until_end(sock) == b""  # the pod's end, after ours
    assert busy.requests  # it was asked, and answered 503
    assert not any(b"EARLY" in raw for raw in busy.raw_received())
    received = b"".join(switched.raw_received())
    assert received.count(b"EARLY-1") == received.count(b"EARLY-2") == 1


def _upgraded(connection: PodConnection) -> bool:
    """A raw pod's side of a `foo` handshake: the request read, the 101 sent."""
    if connection.read_request() is None:
        return False
    return connection.send(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n"
                           b"Upgrade: foo\r\n\r\n")


def _until_end(sock: socket.socket) -> bytes:
    """What `sock` receives until its peer's FIN (bounded by the socket's timeout)."""
    received = b""
    while piece := sock.recv(65536):
        received += piece
    return received


def answer_at_the_end(connection: PodConnection) -> None:
    """A raw pod that reads everything the client sends, then, at its end, answers."""
    if _upgraded(connection):
        received = b""
        while data := connection._recv():
            received += data
        connection.send(b"got " + received.upper())


def test_a_client_that_half_closes_still_gets_the_answer(
    start_raw_pods: StartRawPods, start_router: StartRouter
) -> None:
    """The client's FIN is passed on to the pod, and the pod's answer after it reaches
    the client: the router used to close the pod's connection at the client's FIN, and
    the answer was lost."""
    pod = start_raw_pods(answer_at_the_end)[0]
    client = start_router(static_config([pod]))
    sock, answer = raw_upgrade(client.base_url.port or 0, b"foo")
    with sock:
        assert answer.startswith(b"HTTP/1.1 101 ")
        sock.sendall(b"abc")
        sock.sendall(b"def")
        sock.shutdown(socket.SHUT_WR)
        assert _until_end(sock) == b"got ABCDEF"  # then the pod's end closed the tunnel


def test_a_pod_that_half_closes_still_gets_what_the_client_sends(
    start_raw_pods: StartRawPods, start_router: StartRouter
) -> None:
    received: list[bytes] = []

    def said_all(connection: PodConnection) -> None:
        if _upgraded(connection):
            connection.send(b"that is all\n")
            connection.sock.shutdown(socket.SHUT_WR)
            while data := connection._recv():
                received.append(data)
            received.append(b"<end>")

    pod = start_raw_pods(said_all)[0]
    client = start_router(static_config([pod]))
    sock, answer = raw_upgrade(client.base_url.port or 0, b"foo")
    with sock:
        _, _, early = answer.partition(b"\r\n\r\n")
        assert early + _until_end(sock) == b"that is all\n"  # and the pod's FIN
        sock.sendall(b"one more thing")
        sock.shutdown(socket.SHUT_WR)
        eventually(lambda: received[-1:] == [b"<end>"])
        assert b"".join(received) == b"one more thing<end>"
        assert _until_end(sock) == b""  # both ends have half-closed: the tunnel closed


def test_a_websocket_clients_fin_frees_its_tunnel_whatever_the_pod_does(
    start_raw_pods: StartRawPods, start_router: StartRouter
) -> None:
    """WebSocket has no half-close: a client that just goes (a FIN, all the router sees of
    a close) ends the tunnel and frees its per-client slot, though the pod neither reads
    nor writes."""
    release = threading.Event()

    def busy(connection: PodConnection) -> None:
        if connection.read_request() is not None:
            connection.send(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n"
                            b"Upgrade: websocket\r\n\r\n")
            release.wait(3 * WAIT)  # longer than `eventually` waits; released at the end

    pod = start_raw_pods(busy)[0]
    client = start_router(static_config([pod], upgrade_max_per_client=1))
    tunnels = client.app._proxy.tunnels  # type: ignore[attr-defined]
    try:
        for _ in range(2):  # the second would be a 429 if the first held its slot
            sock, answer = raw_upgrade(client.base_url.port or 0, b"websocket")
            assert answer.startswith(b"HTTP/1.1 101 ")
            eventually(lambda: len(tunnels) == 1)  # the 101 goes out before it is counted
            sock.close()
            eventually(lambda: len(tunnels) == 0)
    finally:
        release.set()


@pytest.mark.parametrize(("protocol", "client_fin"), [(b"foo", True), (b"websocket", False)],
                         ids=["after-both-fins", "websocket"])
def test_an_end_that_reads_nothing_is_aborted_at_the_idle_timeout(
    protocol: bytes, client_fin: bool, start_raw_pods: StartRawPods,
    start_router: StartRouter
) -> None:
    """The pod has gone (after the client's FIN, or in WebSocket, which has no half-close)
    while the router still holds bytes for a client that reads nothing: closing the
    client waits for them, and the tunnel used to stop its timers then, holding the
    tunnel, its descriptors and the client's slot for ever."""
    stop = threading.Event()

    def trickle(connection: PodConnection) -> None:
        if connection.read_request() is not None and connection.send(
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: "
                + protocol + b"\r\n\r\n"):
            while not stop.is_set() and connection.send(b"z" * 4096):
                time.sleep(0.002)
        # then `RawPod` closes the connection: the pod has gone

    pod = start_raw_pods(trickle)[0]
    client = start_router(static_config([pod], upgrade_idle_timeout=1))
    tunnels = client.app._proxy.tunnels  # type: ignore[attr-defined]
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and it never reads
    with sock:
        sock.connect(("127.0.0.1", client.base_url.port or 0))
        sock.sendall(b"GET /raw HTTP/1.1\r\nHost: sandbox\r\nConnection: Upgrade\r\n"
                     b"Upgrade: " + protocol + b"\r\n\r\n")
        if client_fin:
            sock.shutdown(socket.SHUT_WR)
        eventually(lambda: len(tunnels) == 1)
        (tunnel,) = tunnels._open
        eventually(lambda: tunnel._client.get_write_buffer_size() > 0)  # the router holds some
        stop.set()
        eventually(lambda: tunnel.closing)  # the pod has gone; the client reads nothing
        eventually(lambda: len(tunnels) == 0)  # aborted at the idle timeout


@pytest.mark.parametrize("protocol", [b"foo", b"websocket"])
def test_a_client_reading_a_large_download_slowly_is_not_cut_at_the_idle_timeout(
    protocol: bytes, start_raw_pods: StartRawPods, start_router: StartRouter
) -> None:
    """The pod sends 4 MiB and goes (WebSocket: the tunnel then closes; else its FIN is
    passed on); the client reads them in small pieces every 5 ms, seconds past the idle
    timeout. For longer than that timeout nothing is read from either end (the pod is
    paused behind the client, then gone) and the router's own buffer stays the same while
    the kernel's send queue drains, but the client takes bytes all along: all of them
    arrive, then the end."""
    size = 4 * 1024 * 1024

    def send_and_go(connection: PodConnection) -> None:
        if connection.read_request() is not None and connection.send(
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: "
                + protocol + b"\r\n\r\n"):
            connection.send(b"z" * size)

    pod = start_raw_pods(send_and_go)[0]
    client = start_router(static_config([pod], upgrade_idle_timeout=0.5))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(30)
    with sock:
        sock.connect(("127.0.0.1", client.base_url.port or 0))
        sock.sendall(b"GET /raw HTTP/1.1\r\nHost: sandbox\r\nConnection: Upgrade\r\n"
                     b"Upgrade: " + protocol + b"\r\n\r\n")
        received = b""
        while piece := sock.recv(65536):  # a reset fails the test
            received += piece
            time.sleep(0.005)
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 ")
    assert body == b"z" * size


def echo_raw(connection: PodConnection) -> None:
    """A raw pod that switches to `foo` and echoes what it reads."""
    if _upgraded(connection):
        while data := connection._recv():
            connection.send(data)


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
@pytest.mark.parametrize("traffic", [False, True], ids=["silent", "one-echo"])
def test_an_idle_tunnel_ends_one_idle_timeout_after_its_last_traffic(
    loop: str, traffic: bool, start_raw_pods: StartRawPods, start_router: StartRouter
) -> None:
    """Not two: what an end took since the last check is dated at that check, and checks
    run four times a timeout (the 101 itself, taken at the first check, once kept the
    tunnel a whole timeout longer)."""
    timeout = 1.0
    pod = start_raw_pods(echo_raw)[0]
    client = start_router(static_config([pod], upgrade_idle_timeout=timeout), loop=loop)
    tunnels = client.app._proxy.tunnels  # type: ignore[attr-defined]
    sock, _ = raw_upgrade(client.base_url.port or 0, b"foo")
    with sock:
        last = time.monotonic()
        eventually(lambda: len(tunnels) == 1)  # the 101 goes out before the tunnel is counted
        if traffic:
            sock.sendall(b"ping")
            assert sock.recv(100) == b"ping"
            last = time.monotonic()
        eventually(lambda: len(tunnels) == 0)
        ended = time.monotonic()
    assert timeout - 0.1 <= ended - last < 1.5 * timeout


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_tunnel_whose_client_left_ends_at_the_idle_timeout_though_its_pod_reads_nothing(
    loop: str, start_raw_pods: StartRawPods, start_router: StartRouter,
    caplog: pytest.LogCaptureFixture
) -> None:
    """The client sends, then goes; the pod reads nothing, so what the router holds for it
    stays. The idle timeout resets the pod's end, although the client's transport is
    closed by then (uvloop: setting its linger raised, and the pod was never reset)."""
    stop = threading.Event()

    def deaf(connection: PodConnection) -> None:
        if connection.read_request() is not None and connection.send(
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n"
                b"Upgrade: websocket\r\n\r\n"):
            stop.wait(20)

    pod = start_raw_pods(deaf)[0]
    client = start_router(static_config([pod], upgrade_idle_timeout=1), loop=loop)
    tunnels = client.app._proxy.tunnels  # type: ignore[attr-defined]
    sock, _ = raw_upgrade(client.base_url.port or 0, b"websocket")
    try:
        eventually(lambda: len(tunnels) == 1)
        (tunnel,) = tunnels._open
        sock.setblocking(False)
        deadline = time.monotonic() + 10
        while tunnel._pod.get_write_buffer_size() == 0:  # the kernel's queue is full
            assert time.monotonic() < deadline
            with contextlib.suppress(BlockingIOError):
                sock.send(b"x" * 1024)
            time.sleep(0.001)
        sock.close()
        eventually(lambda: tunnel.closing)
        eventually(lambda: len(tunnels) == 0, timeout=5)
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    finally:
        stop.set()
        sock.close()


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_tunnel_cut_by_a_limit_is_reset_not_ended(
    loop: str, start_raw_pods: StartRawPods, start_router: StartRouter
) -> None:
    """A tunnel has no framing: had the client seen a clean end after what the kernel still
    held for it, it would take the part of a download it got for all of it."""
    stop = threading.Event()

    def flood(connection: PodConnection) -> None:
        if _upgraded(connection):
            while not stop.is_set() and connection.send(b"z" * 65536):
                pass

    pod = start_raw_pods(flood)[0]
    client = start_router(static_config([pod], upgrade_idle_timeout=0.5), loop=loop)
    tunnels = client.app._proxy.tunnels  # type: ignore[attr-defined]
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and it reads nothing
    sock.settimeout(10)
    try:
        sock.connect(("127.0.0.1", client.base_url.port or 0))
        sock.sendall(b"GET /raw HTTP/1.1\r\nHost: sandbox\r\nConnection: Upgrade\r\n"
                     b"Upgrade: foo\r\n\r\n")
        eventually(lambda: len(tunnels) == 1)
        eventually(lambda: len(tunnels) == 0)  # the idle timeout: the client took nothing
        with pytest.raises(ConnectionResetError):
            while sock.recv(65536):
                pass
    finally:
        stop.set()
        sock.close()


class BufferingTransport:
    """A transport that, as uvloop's and asyncio's do, tells its protocol `pause_writing`
    once: when a write takes its buffer past the high-water mark (nothing drains here)."""

    HIGH = 64 * 1024

    def __init__(self) -> None:
        self.protocol = asyncio.Protocol()
        self.buffered = 0
        self.paused = False
        self.reading = False
        self.aborted: float | None = None  # when, in loop time
        self.ended = asyncio.Event()

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_extra_info(self, name: str) -> None:
        return None  # no socket: no kernel queue to read, no linger to set

    def abort(self) -> None:
        self.aborted = asyncio.get_running_loop().time()
        self.ended.set()

    def set_protocol(self, protocol: asyncio.Protocol) -> None:
        self.protocol = protocol

    def write(self, data: bytes) -> None:
        self.buffered += len(data)
        if self.buffered > self.HIGH and not self.paused:
            self.paused = True
            self.protocol.pause_writing()

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.aborted is not None


def test_bytes_an_end_took_keep_the_tunnel_one_whole_idle_timeout() -> None:
    """Seen at a check, they are dated at it, never earlier: the tunnel is not cut before
    a whole timeout has passed since they were taken (dated at the check before, it was
    cut after three quarters of one)."""
    async def cut_after_the_take() -> float:
        client, pod = BufferingTransport(), BufferingTransport()
        Tunnel(client, b"", pod, b"x" * 1000, b"HTTP/1.1 101 \r\n\r\n", 1.0, 0)  # type: ignore[arg-type]
        await asyncio.sleep(0.45)
        client.buffered = 0  # the client's TCP stack took all it was sent
        taken = asyncio.get_running_loop().time()
        await asyncio.wait_for(client.ended.wait(), 5)
        assert client.aborted is not None and pod.aborted is not None
        return client.aborted - taken

    assert 1.0 <= asyncio.run(cut_after_the_take()) < 1.5


@pytest.mark.parametrize("first", ["pod_early", "client_early"])
def test_a_first_write_past_the_high_water_mark_keeps_the_other_end_paused(first: str) -> None:
    """The 101 with what the pod sent behind it, or what the client sent behind its
    handshake, can fill a slow end's buffer with the tunnel's first write. The end's side
    must hear of it, or the other end is read on, without bound, into a buffer that is
    already full (the side was told only when it was set before the write)."""
    async def start() -> tuple[bool, bool]:
        client, pod = BufferingTransport(), BufferingTransport()
        early = {"client_early": b"", "pod_early": b"", first: b"x" * 100_000}
        Tunnel(client, early["client_early"], pod, early["pod_early"],  # type: ignore[arg-type]
               b"HTTP/1.1 101 Switching Protocols\r\n\r\n", 0, 0)
        return client.reading, pod.reading

    client_read, pod_read = run(start)
    if first == "pod_early":  # the client's buffer is full: the pod waits
        assert (client_read, pod_read) == (True, False)
    else:  # the pod's is: the client waits
        assert (client_read, pod_read) == (False, True)


@pytest.mark.parametrize("framing", [b"Content-Length: 5\r\n",
                                     b"Transfer-Encoding: chunked\r\n"])
def test_an_upgrade_request_with_a_body_is_refused(
    framing: bytes, start_raw_pods: StartRawPods, start_router: StartRouter
) -> None:
    """The parser stops at the end of an upgrade head, so a body after it cannot be framed:
    it used to reach the pod as tunnel bytes after a head saying `content-length: 0`."""
    pod = start_raw_pods(echo_upper)[0]
    client = start_router(static_config([pod]))
    port = client.base_url.port or 0
    raw = RawClient(port)
    raw.send(b"POST /raw HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: foo\r\n"
             + framing + b"\r\n")
    answer = raw.answer()
    assert answer is not None and answer.status == 400
    assert answer.detail() == "An upgrade request cannot carry a body."
    raw.send(b"hello" if framing.startswith(b"Content") else b"5\r\nhello\r\n0\r\n\r\n")
    assert raw.closed()
    raw.close()
    assert pod.requests == []
    sock, answer_head = raw_upgrade(port, b"foo")  # the router goes on serving upgrades
    sock.close()
    assert answer_head.startswith(b"HTTP/1.1 101 ")
    assert [request.header(b"content-length") for request in pod.requests] == [None]


def test_metrics_and_the_access_line_cover_the_whole_life(
    start_ws_pods: StartWsPods, start_router: StartRouter
) -> None:
    pod = start_ws_pods(1)[0]
    metrics = Metrics(proxy_timeout=30)
    metrics.serve(bind("127.0.0.1"))
    recorder = Recorder()
    url = url_of(start_router(config([pod]), metrics=metrics, observer=recorder))
    gauge = "warmpool_router_upgraded_connections"
    requests = "warmpool_router_requests_total"

    async def session() -> None:
        async with websocket(url) as ws:
            await echo(ws, "x" * 100)
            samples = await asyncio.to_thread(scrape, metrics.port)
            assert value(samples, gauge) == 1  # open
            assert value(samples, requests, route="pool", method="GET", code="101") == 1
            assert recorder.finished == []  # not finished while open
            await asyncio.sleep(0.3)  # a life the duration must cover

    run(session)
    eventually(lambda: len(recorder.finished) == 1)
    samples = scrape(metrics.port)
    assert value(samples, gauge) == 0
    assert value(samples, requests, route="pool", method="GET", code="101") == 1
    count = "warmpool_router_request_duration_seconds_count"
    assert value(samples, count, route="pool") == 1
    assert value(samples, "warmpool_router_request_duration_seconds_sum", route="pool") >= 0.3
    line = json.loads(access_line(recorder.finished[0], time.time()))
    assert line["status"] == 101
    assert line["duration_ms"] >= 300
    # A masked client frame of 100 bytes is 106 bytes, its echo 102; then the close frames.
    assert line["bytes_in"] >= 106 and line["bytes_out"] >= 102
    assert line["pod"] == "pod-0"


def test_sigterm_gives_tunnels_the_shutdown_timeout_then_closes_them(
    start_ws_pods: StartWsPods,
) -> None:
    pod = start_ws_pods(1)[0]
    router = RouterProcess(["--pods", f"{pod.ip}:{pod.port}", "--shutdown-timeout", "1"])
    try:
        async def session() -> aiohttp.WSMsgType:
            async with websocket(router.url) as ws:
                await echo(ws, "before")
                router.process.send_signal(signal.SIGTERM)
                await echo(ws, "during the drain")  # still carried
                return (await ws.receive()).type

        assert run(session) in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
        assert router.process.wait(timeout=20) == 0
    finally:
        router.stop()
    assert any("closing an upgraded connection: shutting down" in line
               for line in router.lines)
    assert any('"status": 101' in line for line in router.lines)  # its access line
    assert not any("Traceback" in line for line in router.lines)
    assert not any("WebSocket library" in line or "Unsupported upgrade" in line
                   for line in router.lines)  # uvicorn's advice is not printed
    eventually(lambda: pod.ended == 1)


def test_300_idle_upgraded_connections_cost_little_memory(
    start_ws_pods: StartWsPods,
) -> None:
    pod = start_ws_pods(1)[0]
    router = RouterProcess(["--pods", f"{pod.ip}:{pod.port}", "--upgrade-max-per-client", "0",
                            "--upgrade-max", "0", "--no-access-log"])
    process = psutil.Process(router.process.pid)
    count = 300

    async def hold() -> float:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            first = await session.ws_connect(router.url + "/ws", autoping=False)
            await first.send_str("warm")
            await first.receive()
            before = process.memory_info().rss
            sockets = [await session.ws_connect(router.url + "/ws", autoping=False)
                       for _ in range(count)]
            for ws in sockets:
                await echo(ws, "hi")
            grown = process.memory_info().rss - before
            for ws in [first, *sockets]:
                await ws.close()
            return grown / count

    try:
        per_connection = run(hold, timeout=120)
    finally:
        router.stop()
    print(f"\nrouter memory per idle upgraded connection: {per_connection / 1024:.1f} KiB")
    assert per_connection < 64 * 1024
    eventually(lambda: pod.ended == count + 1)


def test_upgrade_without_connection_upgrade_is_an_ordinary_request(
    start_raw_pods: StartRawPods, start_router: StartRouter
) -> None:
    pod = start_raw_pods(answering(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"))[0]
    client = start_router(static_config([pod]))
    with socket.create_connection(("127.0.0.1", client.base_url.port or 0), timeout=10) as sock:
        for _ in range(2):  # the same connection goes on: it is not handed over
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: foo\r\n\r\n")
            answer = b""
            while not answer.endswith(b"ok"):
                piece = sock.recv(4096)
                assert piece, answer
                answer += piece
            assert answer.startswith(b"HTTP/1.1 200 ")
    assert [request.header(b"upgrade") for request in pod.requests] == [None, None]


@pytest.mark.parametrize(("peer", "forwarded", "expected"), [
    ("10.0.0.9", ["1.1.1.1"], "10.0.0.9"),  # an untrusted peer: its own address
    ("127.0.0.1", [], "127.0.0.1"),  # trusted, but no header
    ("127.0.0.1", ["1.1.1.1, 2.2.2.2"], "2.2.2.2"),  # the right-most hop
    ("127.0.0.1", ["1.1.1.1", "2.2.2.2, 192.0.2.1"], "2.2.2.2"),  # trusted hops skipped
    ("127.0.0.1", ["192.0.2.1, ::ffff:192.0.2.2"], "192.0.2.1"),  # all trusted: the first
    ("127.0.0.1", ["1.1.1.1, unknown"], "unknown"),  # not an address: nobody vouches for it
])
def test_the_client_address_is_the_right_most_untrusted_hop(
    peer: str, forwarded: list[str], expected: str
) -> None:
    trusted = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("192.0.2.0/24"))
    headers = [(b"x-forwarded-for", value.encode()) for value in forwarded]
    assert client_address(peer, headers, trusted) == expected
    assert client_address(peer, headers, ()) == peer  # no trusted proxy: never read


def test_bytes_behind_a_handshake_pipelined_behind_a_request_reach_the_pod_after_its_101(
    start_raw_pods: StartRawPods, start_router: StartRouter
) -> None:
    """A handshake queued behind a request in flight: the end of that request's answer
    resumed reading, though the handshake had paused it, so bytes the client sent before
    the 101 were parsed as HTTP (the connection then closed, no 101) instead of waiting
    for the tunnel."""
    later_sent = threading.Event()

    def plain_then_switching(connection: PodConnection) -> None:
        while (request := connection.read_request()) is not None:
            if request.header(b"upgrade") is None:
                connection.send(OK)
                continue
            if later_sent.wait(WAIT) and connection.send(
                    b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n"
                    b"Upgrade: foo\r\n\r\n"):
                received = b""
                while len(received) < len(b"EARLYLATER") and (data := connection._recv()):
                    received += data
                connection.send(received)  # what the tunnel brought, in one piece
            return

    pod = start_raw_pods(plain_then_switching)[0]
    client = RawClient(start_router(static_config([pod])).base_url.port or 0)
    client.send(b"GET /first HTTP/1.1\r\nHost: r\r\n\r\n"
                b"GET /ws HTTP/1.1\r\nHost: r\r\nConnection: upgrade\r\nUpgrade: foo\r\n\r\n"
                b"EARLY")
    first = client.answer()
    assert first is not None and first.body == b"ok"
    client.send(b"LATER")  # after the first answer, before the 101
    later_sent.set()
    switched = client.answer()
    assert switched is not None and switched.status == 101
    received = client._pending
    while len(received) < len(b"EARLYLATER") and (more := client._recv()):
        received += more
    assert received == b"EARLYLATER"
    client.close()
