"""Accepting a burst (`router/accepting.py`): one accepted connection takes the rest of
the queue, bounded; every connection so taken is served and its descriptor freed."""

from __future__ import annotations

import asyncio
import os
import socket
import threading

import pytest

from router import accepting
from router.accepting import AcceptBurst
from router.server import ServerThread
from tests.conftest import StartPods, StartRouter, static_config
from tests.loops import LOOPS, run_on
from tests.rawclient import RawClient


class Echo(asyncio.Protocol):
    """Says hello on connect; the connection ends when the client's does."""

    made: list[Echo] = []
    lost = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        Echo.made.append(self)
        transport.write(b"hello")  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        Echo.lost += 1


@pytest.mark.parametrize("loop_name", LOOPS)
@pytest.mark.parametrize(("waiting", "burst"), [(10, 512), (10, 3)])
def test_one_call_takes_the_queue_up_to_the_burst(
    loop_name: str, waiting: int, burst: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(accepting, "BURST", burst)
    Echo.made, Echo.lost = [], 0
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    listener.setblocking(False)
    sockets = open_sockets()
    clients = [socket.create_connection(listener.getsockname()) for _ in range(waiting)]

    async def main() -> None:
        taker = AcceptBurst(asyncio.get_running_loop(), [listener.fileno()], Echo)
        taker.more()
        for _ in range(500):  # until each taken connection is served
            if len(Echo.made) == min(waiting, burst):
                break
            await asyncio.sleep(0.01)
        assert len(Echo.made) == min(waiting, burst)
        left = 0
        while True:  # what the burst left in the queue
            try:
                listener.accept()[0].close()
            except BlockingIOError:
                break
            left += 1
        assert left == waiting - min(waiting, burst)
        for client in clients[: len(Echo.made)]:
            client.settimeout(5)
            assert client.recv(5) == b"hello"
        for client in clients:
            client.close()
        for _ in range(500):  # until every served connection saw its client leave
            if Echo.lost == len(Echo.made):
                break
            await asyncio.sleep(0.01)
        taker.close()

    try:
        run_on(loop_name, main())
    finally:
        listener.close()
    # The duplicate listening descriptor and every accepted one are closed again.
    assert open_sockets() == sockets - 1


def open_sockets() -> int:
    """Socket descriptors of this process (a loop's own pipes are not the question)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:  # the descriptor listdir itself used
            continue
    return count


def test_a_busy_router_takes_a_burst_of_new_connections_in_one_turn(
    start_pods: StartPods, start_router: StartRouter, servers: list[ServerThread],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """100 clients connect while the router's loop is held (a turn taking long, as under
    load): once it turns, the first connection libuv accepts takes the other 99 with it
    (libuv alone would take one per turn), and every one of them is served."""
    pods = start_pods(1)
    port = start_router(static_config(pods)).base_url.port
    assert port is not None
    burst = servers[-1].server.config.http_protocol_class.burst
    assert isinstance(burst, AcceptBurst)  # the server wired it to its listening socket
    taken: list[int] = []
    more = AcceptBurst.more
    monkeypatch.setattr(AcceptBurst, "more", lambda self: taken.append(more(self)) or 0)
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        holding.set()
        release.wait(10)

    burst.loop.call_soon_threadsafe(hold)
    assert holding.wait(10)
    try:
        clients = [RawClient(port) for _ in range(100)]  # queued by the kernel meanwhile
    finally:
        release.set()
    for client in clients:
        client.send(b"GET / HTTP/1.1\r\nHost: router\r\n\r\n")
    for client in clients:
        answer = client.answer()
        assert answer is not None and answer.status == 200
        client.close()
    assert pods[0].app.hits == 100
    assert max(taken) == 99
