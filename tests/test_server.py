"""The process as operators run it: drain on SIGTERM, and `--workers`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import httpx
import psutil
import pytest
import uvicorn
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.server import ServerState

from router.app import Router
from router.config import Config
from router.protocol import HttpProtocol
from router.server import DrainingServer, server_config
from tests.conftest import (
    StartPods,
    StartRouter,
    eventually,
    free_port,
    scrape,
    static_config,
    value,
)
from tests.process import RouterProcess
from tests.rawclient import RawClient
from tests.sandbox import Pod


def test_sigterm_drains_in_flight_requests_then_exits_0(start_pods: StartPods) -> None:
    pod = start_pods(1)[0]
    # A grace window long enough that a loaded machine still gets the probe and the new
    # request below in before the listener closes; the slow request outlasts it.
    router = RouterProcess(["--pods", f"{pod.ip}:{pod.port}", "--drain-grace", "4",
                            "--shutdown-timeout", "20"])
    answers: list[httpx.Response] = []
    slow = threading.Thread(
        target=lambda: answers.append(httpx.get(router.url + "/slow?seconds=6", timeout=30))
    )
    slow.start()
    eventually(lambda: pod.app.hits == 1)

    router.process.send_signal(signal.SIGTERM)
    eventually(lambda: httpx.get(router.url + "/ready").status_code == 503)
    assert httpx.get(router.url + "/ready").json() == {"status": "not ready",
                                                       "reason": "shutting down"}
    assert httpx.get(router.url + "/").status_code == 200  # new connections, in the grace window
    assert router.process.wait(timeout=20) == 0
    slow.join()

    assert answers[0].status_code == 200
    assert answers[0].text == "slow"
    assert any("draining" in line for line in router.lines)


def test_shutdown_timeout_bounds_the_drain(start_pods: StartPods) -> None:
    pod = start_pods(1)[0]
    router = RouterProcess(["--pods", f"{pod.ip}:{pod.port}", "--shutdown-timeout", "1"])
    answers: list[httpx.Response] = []
    client = threading.Thread(
        target=lambda: answers.append(httpx.get(router.url + "/slow?seconds=60", timeout=30))
    )
    client.start()
    eventually(lambda: pod.app.hits == 1)
    router.process.send_signal(signal.SIGTERM)

    assert router.process.wait(timeout=20) == 0
    client.join()
    assert answers[0].status_code == 503  # cut off at the budget, not waited for
    assert answers[0].json() == {"detail": "The router is shutting down."}
    assert any("Cancel 1 running task" in line for line in router.lines)
    assert not any("Traceback" in line for line in router.lines)


def test_workers_share_the_port_and_drain_together(start_pods: StartPods) -> None:
    pods = start_pods(2)
    listed = ",".join(f"{pod.ip}:{pod.port}" for pod in pods)
    router = RouterProcess(["--pods", listed, "--workers", "2"])
    with httpx.Client(base_url=router.url) as client:
        started = "Application startup complete"
        eventually(lambda: sum(started in line for line in router.lines) == 2)
        assert [client.get("/").status_code for _ in range(20)] == [200] * 20
    assert pods[0].app.hits + pods[1].app.hits == 20

    assert router.stop() == 0
    assert any("with 2 workers" in line for line in router.lines)


def listening_sockets(pid: int, port: int) -> set[int]:
    """The inodes of the listening TCP sockets on `port` that process `pid` holds."""
    held = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                held.add(int(target[8:-1]))
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    return {int(row[9]) for row in rows
            if row[3] == "0A" and int(row[1].split(":")[1], 16) == port and int(row[9]) in held}


def test_workers_each_accept_from_a_socket_of_their_own(start_pods: StartPods) -> None:
    """Each worker listens on a socket of its own on the port (SO_REUSEPORT), so the
    kernel spreads new connections over them; from one shared socket, whichever worker
    woke first took what waited (256 connections split up to 40/216 under wrk). The
    distinct listeners are what fails with a shared socket; the split that follows holds
    either way here (the stopped worker, resumed, races the other for a shared queue),
    and is the check that each worker serves its own: 64 connections opened while one
    worker is stopped, each answered once and held open, both workers hold at least 16
    (a fair split falls below that about once in 10,000 runs)."""
    pods = start_pods(1)
    router = RouterProcess(["--pods", f"{pods[0].ip}:{pods[0].port}", "--workers", "2"])
    clients: list[socket.socket] = []
    try:
        started = "Application startup complete"
        eventually(lambda: sum(started in line for line in router.lines) == 2)
        workers = [child for child in psutil.Process(router.process.pid).children()
                   if "spawn_main" in " ".join(child.cmdline())]  # not the resource tracker
        assert len(workers) == 2
        own = [listening_sockets(worker.pid, router.port) for worker in workers]
        assert [len(sockets) for sockets in own] == [1, 1] and own[0] != own[1]
        busy = workers[0]
        busy.suspend()
        try:
            clients = [socket.create_connection(("127.0.0.1", router.port))
                       for _ in range(64)]
            for client in clients:
                client.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        finally:
            busy.resume()
        for client in clients:
            assert client.recv(65536).startswith(b"HTTP/1.1 200 ")
        held = sorted(sum(1 for c in worker.net_connections("tcp")
                          if c.laddr.port == router.port and c.status == psutil.CONN_ESTABLISHED)
                      for worker in workers)
        assert sum(held) == 64
        assert held[0] >= 16, held
    finally:
        for client in clients:
            client.close()
        assert router.stop() == 0


def test_a_dead_workers_socket_leaves_the_port(start_pods: StartPods) -> None:
    """A worker that dies takes its socket off the port: the others, stopped in turn,
    serve new connections through their drain grace as before. Left open in the
    supervisor, the dead worker's socket still got its share of the port's connections,
    which nobody accepted: they waited out the drain, then were reset."""
    pods = start_pods(1)
    router = RouterProcess(["--pods", f"{pods[0].ip}:{pods[0].port}", "--workers", "2",
                            "--drain-grace", "6", "--shutdown-timeout", "10"])
    try:
        started = "Application startup complete"
        eventually(lambda: sum(started in line for line in router.lines) == 2)
        workers = [child for child in psutil.Process(router.process.pid).children()
                   if "spawn_main" in " ".join(child.cmdline())]
        workers[0].kill()
        eventually(lambda: any("stopping the others" in line for line in router.lines))
        # New connections, as clients behind the Service open them in the grace window.
        clients = [RawClient(router.port, timeout=3) for _ in range(16)]
        answers = []
        for client in clients:
            client.send(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        for client in clients:
            try:
                answer = client.answer()
                answers.append(answer.status if answer is not None else "closed")
            except TimeoutError:
                answers.append("waiting")
            finally:
                client.sock.close()
        assert answers == [200] * 16
    finally:
        router.stop()


def test_workers_metrics_are_gathered_into_one_endpoint(start_pods: StartPods) -> None:
    pods = start_pods(2)
    listed = ",".join(f"{pod.ip}:{pod.port}" for pod in pods)
    metrics_port = free_port()  # the supervisor binds it itself
    router = RouterProcess(["--pods", listed, "--workers", "2",
                            "--metrics-port", str(metrics_port)])
    try:
        with httpx.Client(base_url=router.url) as client:
            assert [client.get("/").status_code for _ in range(20)] == [200] * 20
        samples = scrape(metrics_port)
    finally:
        assert router.stop() == 0
    requests = "warmpool_router_requests_total"
    assert value(samples, requests, route="pool", method="GET", code="200") == 20
    assert value(samples, "warmpool_router_upstream_attempts_total", outcome="ok") == 20
    assert value(samples, "warmpool_router_pool_pods") == 2
    assert value(samples, "warmpool_router_build_info", version="0.1.0") == 1


class RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.reading = True

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


class PieceRecorder(HttpProtocol):
    """Keeps every body piece the parser hands over, to check what reaches the app."""

    pieces: list[bytes]

    def on_body(self, body: bytes) -> None:
        self.pieces.append(body)
        super().on_body(body)


def test_request_body_pieces_reach_the_app_whole_in_order_and_uncopied() -> None:
    """Pieces that arrive before the app reads are joined; a piece the app is waiting for
    reaches it as the very object the parser made, and one past uvicorn's high-water mark
    pauses reading; a read of many small chunks is joined too."""
    big = b"z" * (HIGH_WATER_LIMIT + 1)
    tail = b"t" * (HIGH_WATER_LIMIT + 1)
    digits = bytes(48 + i % 10 for i in range(1000))
    chunked = b"".join(b"1\r\n%c\r\n" % digit for digit in digits) + b"0\r\n\r\n"

    async def scenario() -> tuple[list[tuple[bytes, bool]], bool, PieceRecorder]:
        received: asyncio.Queue[tuple[bytes, bool]] = asyncio.Queue()
        go = asyncio.Event()

        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            await go.wait()  # the first pieces pile up meanwhile
            more = True
            while more:
                message = await receive()
                more = message["more_body"]
                received.put_nowait((message["body"], more))
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        config = uvicorn.Config(app, http=PieceRecorder, lifespan="off", log_config=None)
        protocol = PieceRecorder(config=config, server_state=ServerState(), app_state={})
        protocol.pieces = []
        transport = RecordingTransport()
        protocol.connection_made(transport)  # type: ignore[arg-type]
        length = 6 + len(big) + len(tail)
        protocol.data_received(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\nabc"
                               % length)
        protocol.data_received(b"def")
        protocol.data_received(big)
        go.set()
        bodies = [await asyncio.wait_for(received.get(), 10)]
        protocol.data_received(tail)  # the app waits for it: nothing piled up
        paused = not transport.reading
        bodies.append(await asyncio.wait_for(received.get(), 10))
        assert bodies[-1][0] is protocol.pieces[-1]
        # The next request on the connection: 1,000 one-byte chunks in a single read.
        protocol.data_received(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked"
                               b"\r\n\r\n" + chunked)
        bodies.append(await asyncio.wait_for(received.get(), 10))
        while bodies[-1][1]:
            bodies.append(await asyncio.wait_for(received.get(), 10))
        return bodies, paused, protocol

    bodies, paused, protocol = asyncio.run(scenario())
    assert bodies[:2] == [(b"abcdef" + big, True), (tail, False)]
    assert paused
    assert b"".join(body for body, _ in bodies[2:]) == digits
    assert all(type(body) is bytes for body, _ in bodies)
    assert len(protocol.pieces) == 4 + 1000


def test_above_limit_concurrency_the_router_answers_503_itself(
    start_pods: StartPods, start_router: StartRouter
) -> None:
    pod = start_pods(1)[0]
    client = start_router(static_config([pod], limit_concurrency=2))
    answers: list[httpx.Response] = []
    slow = threading.Thread(target=lambda: answers.append(client.get("/slow?seconds=2")))
    slow.start()
    eventually(lambda: pod.app.hits == 1)

    with httpx.Client(base_url=client.base_url) as other:  # a second connection: over it
        refused = other.get("/")
    slow.join()

    assert refused.status_code == 503
    assert answers[0].status_code == 200
    assert pod.app.hits == 1  # the refused request never reached a pod
    assert client.get("/").status_code == 200


@pytest.mark.parametrize("timer", ["keep-alive", "head"])
def test_a_request_waiting_through_a_long_loop_turn_is_served_not_dropped(
    timer: str, start_pods: StartPods, start_router: StartRouter,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reads of one turn of the event loop outlast an idle connection's timer while
    its next request arrives. uvloop runs the next turn's timers before its reads: the
    connection was closed under the request waiting in its socket, which the client saw
    go unanswered. Now a timer that finds bytes waiting leaves the connection to its
    read."""
    pod = start_pods(1)[0]
    options = ({"timeout_keep_alive": 0.5} if timer == "keep-alive"
               else {"timeout_keep_alive": 30.0, "header_timeout": 0.5})
    client = start_router(static_config([pod], **options))
    turning = threading.Event()
    read = HttpProtocol.data_received

    def slow_read(protocol: HttpProtocol, data: bytes) -> None:
        if data.startswith(b"GET /slow "):  # another client's request: a long turn
            turning.set()
            time.sleep(1.5)
        read(protocol, data)

    monkeypatch.setattr(HttpProtocol, "data_received", slow_read)
    idle, busy = (RawClient(client.base_url.port or 0) for _ in range(2))
    idle.send(b"GET / HTTP/1.1\r\nHost: r\r\n\r\n")
    answer = idle.answer()
    assert answer is not None and answer.status == 200
    busy.send(b"GET /slow HTTP/1.1\r\nHost: r\r\n\r\n")
    assert turning.wait(10)
    idle.send(b"GET /next HTTP/1.1\r\nHost: r\r\n\r\n")  # while the loop is busy
    answer = idle.answer()
    assert answer is not None and answer.status == 200
    assert pod.app.hits == 3
    idle.close()
    busy.close()


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_blank_lines_during_long_turns_extend_an_idle_connection_once(
    loop: str, start_pods: StartPods, start_router: StartRouter,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """A blank line begins no request, so the connection stays idle: had each long turn's
    unread `\\r\\n` re-armed the head timer, a client could hold it for ever without
    sending a request. It is closed within two head timeouts of its last answer."""
    pod = start_pods(1)[0]
    client = start_router(static_config([pod], timeout_keep_alive=30.0, header_timeout=0.5),
                          loop=loop)
    turning = threading.Event()
    read = HttpProtocol.data_received

    def slow_read(protocol: HttpProtocol, data: bytes) -> None:
        if data.startswith(b"GET /turn "):
            turning.set()
            time.sleep(1.5)
        read(protocol, data)

    monkeypatch.setattr(HttpProtocol, "data_received", slow_read)
    idle = RawClient(client.base_url.port or 0)
    idle.send(b"GET / HTTP/1.1\r\nHost: r\r\n\r\n")
    answer = idle.answer()
    assert answer is not None and answer.status == 200
    for _ in range(3):
        turning.clear()
        busy = RawClient(client.base_url.port or 0)
        busy.send(b"GET /turn HTTP/1.1\r\nHost: r\r\n\r\n")
        assert turning.wait(10)
        idle.send(b"\r\n")
        assert busy.answer() is not None
        busy.close()
    idle.sock.settimeout(0.2)  # closed already: at the second turn's end, not 0.5 s later
    assert idle.closed()
    idle.close()


def test_a_fractional_keep_alive_timeout_is_honoured(
    start_pods: StartPods, start_router: StartRouter
) -> None:
    """`--timeout-keep-alive 0.5` was truncated to 0: every connection closed after its
    first answer, keep-alive silently off."""
    pod = start_pods(1)[0]
    client = start_router(static_config([pod], timeout_keep_alive=0.5))
    raw = RawClient(client.base_url.port or 0)
    for _ in range(2):  # the second request rides the same connection
        raw.send(b"GET / HTTP/1.1\r\nHost: r\r\n\r\n")
        answer = raw.answer()
        assert answer is not None and answer.status == 200
    assert pod.app.hits == 2
    assert raw.closed()  # and the idle connection is still closed in the end
    raw.close()


# -- --workers: stopping, whatever the signal and however the start went --


def _both_started(router: RouterProcess) -> None:
    eventually(lambda: sum("startup complete" in line for line in router.lines) == 2)


def test_ctrl_c_to_the_workers_group_lets_every_request_finish(start_pods: StartPods) -> None:
    """A terminal's Ctrl-C reaches the supervisor and every worker. Each worker drained on
    it; the idle one ended first, the supervisor (ignoring SIGINT, so not stopping) took
    that for a failure, logged an error and sent the busy one SIGTERM: a second signal,
    which cut its request in flight (503). Now the workers take no SIGINT and the
    supervisor passes it on once, as SIGTERM."""
    pod = start_pods(1)[0]
    router = RouterProcess(["--pods", f"{pod.ip}:{pod.port}", "--workers", "2",
                            "--drain-grace", "0"])
    try:
        _both_started(router)
        answers: list[httpx.Response] = []
        slow = threading.Thread(target=lambda: answers.append(
            httpx.get(router.url + "/slow?seconds=2", timeout=30)))
        slow.start()
        eventually(lambda: pod.app.hits == 1)  # held at the pod by one of the workers
        os.killpg(router.process.pid, signal.SIGINT)
        assert router.process.wait(timeout=20) == 0
        slow.join(timeout=30)
    finally:
        router.stop()
    assert (answers[0].status_code, answers[0].text) == (200, "slow")
    assert not any("second signal" in line or '"level": "error"' in line
                   for line in router.lines), "".join(router.lines)


def test_sigint_to_the_supervisor_alone_stops_the_workers(start_pods: StartPods) -> None:
    """`kill -INT` of the supervisor (a process manager's stop signal) was ignored."""
    pod = start_pods(1)[0]
    router = RouterProcess(["--pods", f"{pod.ip}:{pod.port}", "--workers", "2",
                            "--drain-grace", "0"])
    try:
        _both_started(router)
        router.process.send_signal(signal.SIGINT)
        assert router.process.wait(timeout=20) == 0
    finally:
        router.kill()


SECOND_SPAWN = """
import multiprocessing.context, os, signal, sys
from router.__main__ import main
real, calls = multiprocessing.context.SpawnProcess._Popen, []
def popen(process_obj):
    calls.append(1)
    if len(calls) == 2:  # while worker-1 is being spawned
        %s
    return real(process_obj)
multiprocessing.context.SpawnProcess._Popen = staticmethod(popen)
main(sys.argv[1:])
"""


def supervised_until_the_second_spawn(action: str, pod: Pod) -> tuple[int, str]:
    """`--workers 2` over `pod`, `action` done as worker-1 is spawned; the supervisor's
    exit status (within 20 s) and output."""
    process = subprocess.Popen(
        [sys.executable, "-c", SECOND_SPAWN % action, "--host", "127.0.0.1", "--port", "0",
         "--metrics-port", "0", "--drain-grace", "0", "--pods", f"{pod.ip}:{pod.port}",
         "--workers", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        status = process.wait(timeout=20)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        output = process.communicate(timeout=10)[0]
    return status, output


def test_a_worker_that_cannot_be_started_stops_the_others_and_fails(
    start_pods: StartPods
) -> None:
    """The exception left the supervisor with the first worker serving, unstopped, and
    the supervisor waiting on it for ever at exit: a pod that never restarts."""
    # as fork or exec fails on a loaded node: EMFILE, ENOMEM, EAGAIN
    status, output = supervised_until_the_second_spawn(
        'raise OSError(24, "Too many open files")', start_pods(1)[0])
    assert status == 1, output
    assert "worker-1 could not start" in output


def test_a_sigterm_before_the_app_is_loaded_starts_the_drain(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """uvicorn takes the signals before it loads the app: a SIGTERM in between raised
    AttributeError (`config.loaded_app` not set yet) in the main thread; then it began
    the drain's clock but found no app to mark, so `/ready` kept answering 200."""
    options = Config(port=0, metrics_port=0, drain_grace=5)
    app = Router(options)
    server = DrainingServer(server_config(options, app), options)
    server.handle_exit(signal.SIGTERM, None)
    assert server._drain_started is not None and not app.draining
    server.config.load()  # what uvicorn's `_serve` does next, then `startup`

    async def listens(self: uvicorn.Server, sockets: object = None) -> None:
        assert app.draining  # marked before anything is accepted

    monkeypatch.setattr(uvicorn.Server, "startup", listens)
    asyncio.run(server.startup())
    assert app.draining


def test_a_scrape_while_a_worker_is_gone_is_a_503_naming_it(start_pods: StartPods) -> None:
    """It was a 500 and a traceback (the dead worker's port refused the connection)."""
    pod = start_pods(1)[0]
    metrics_port = free_port()
    router = RouterProcess(["--pods", f"{pod.ip}:{pod.port}", "--workers", "2",
                            "--metrics-port", str(metrics_port), "--drain-grace", "10",
                            "--shutdown-timeout", "10"])
    try:
        _both_started(router)
        assert httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").status_code == 200
        workers = [child for child in psutil.Process(router.process.pid).children()
                   if "spawn_main" in " ".join(child.cmdline())]
        workers[0].kill()
        eventually(lambda: any("stopping the others" in line for line in router.lines))
        scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
    finally:
        router.stop()
    assert scraped.status_code == 503
    assert "did not answer" in scraped.text
    assert not any("Traceback" in line for line in router.lines), "".join(router.lines)




@pytest.mark.parametrize("sig", ["TERM", "INT"])
def test_a_stop_signal_while_workers_spawn_reaches_every_worker(
    start_pods: StartPods, sig: str
) -> None:
    """The signal waits, blocked, until every worker has a PID to pass it on to. The
    first spawn starts multiprocessing's resource tracker, which unblocked both signals
    in the supervisor (with `--metrics-port 0`; its queue started the tracker earlier
    otherwise): the signal then reached worker-0 only, and the supervisor waited on
    worker-1 for ever."""
    status, output = supervised_until_the_second_spawn(
        f"os.kill(os.getpid(), signal.SIG{sig})", start_pods(1)[0])
    assert status == 0, output


def test_a_worker_that_exits_0_on_its_own_fails_the_supervisor(start_pods: StartPods) -> None:
    """A stray SIGTERM to one worker: it drains and exits 0, the supervisor stops the
    other, and now exits 1, so that a restart policy restarts the whole router."""
    pod = start_pods(1)[0]
    router = RouterProcess(["--pods", f"{pod.ip}:{pod.port}", "--workers", "2",
                            "--drain-grace", "0"])
    try:
        _both_started(router)
        workers = [child for child in psutil.Process(router.process.pid).children()
                   if "spawn_main" in " ".join(child.cmdline())]
        workers[0].send_signal(signal.SIGTERM)
        assert router.process.wait(timeout=30) == 1
    finally:
        router.stop()
    assert any("exited with 0; stopping the others" in line for line in router.lines)


SIGNAL_IN_A_FINALIZER = """
import gc, os, signal, sys
from router import config, run
from router.server import bind

class Stop:
    def __del__(self):  # the supervisor's SIGTERM, handled while a finalizer runs
        os.kill(os.getpid(), signal.SIGTERM)

gc.disable()  # so that the worker's own full collection (`run._settle_heap`) finds it
cycle = Stop()
cycle.self = cycle
del cycle
run._worker(config.load(sys.argv[1:]), 0, bind("127.0.0.1"), None)
"""


def test_a_stop_signal_handled_in_a_finalizer_still_stops_a_starting_worker(
    start_pods: StartPods
) -> None:
    """A Python signal handler runs wherever the main thread is, finalizers and weakref
    callbacks included (a garbage collection runs them), which print an exception they
    raise and drop it: the SystemExit a starting worker raised on SIGTERM was lost there
    ("Exception ignored in: <function WeakSet.__init__.<locals>._remove ...>"), and the
    worker served on, never told again, while its supervisor waited on it for ever."""
    pod = start_pods(1)[0]
    process = subprocess.Popen(
        [sys.executable, "-c", SIGNAL_IN_A_FINALIZER, "--host", "127.0.0.1", "--port", "0",
         "--drain-grace", "0", "--pods", f"{pod.ip}:{pod.port}", "--workers", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        status: int | None = process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        status = None  # serving, the signal lost
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        output = process.communicate(timeout=10)[0]
    assert status == 0, output
    assert "Exception ignored" not in output, output
