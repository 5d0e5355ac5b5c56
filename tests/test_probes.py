"""The probes on the metrics port (`router/probes.py`): answered while the router is
saturated, failing liveness while the serving loop is wedged, and failing readiness on
drain and before the first sync; with `--workers`, the supervisor's asking every worker."""

from __future__ import annotations

import asyncio
import multiprocessing
import signal
import socket
import threading

import httpx
import psutil
import pytest

from router import probes
from router.app import Router
from router.metrics import Metrics
from router.pods import Pod as RouterPod
from router.pods import StaticPodSource
from router.run import WorkerPorts
from tests.conftest import StartPods, StartRouter, eventually, free_port, static_config
from tests.process import RouterProcess
from tests.sandbox import Pod
from tests.test_manifests import router_container

LIMIT = 4  # --limit-concurrency of the saturated router


class Source(StaticPodSource):
    """A static pool that remembers the loop it was started on (for the test to wedge it)
    and can be told that its first sync has not happened yet."""

    def __init__(self, pods: list[Pod]) -> None:
        super().__init__(RouterPod(pod.name, "default", pod.ip, pod.port) for pod in pods)
        self.synced = True
        self.loop: asyncio.AbstractEventLoop | None = None

    def not_ready_reason(self) -> str | None:
        return None if self.synced else "pod list not synced yet"

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()


def admin(metrics: Metrics, path: str, timeout: float = 5.0) -> httpx.Response:
    """A probe as the kubelet makes it: a new connection each time."""
    return httpx.get(f"http://127.0.0.1:{metrics.port}{path}", timeout=timeout)


def manifest_timeout(probe: str) -> float:
    return float(router_container()[probe]["timeoutSeconds"])


def send_requests(port: int, path: str, count: int) -> list[socket.socket]:
    """`count` new connections to the router, each with one request sent and unread."""
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: router\r\n\r\n".encode())
        sockets.append(sock)
    return sockets


def test_admin_probes_answer_while_the_router_is_saturated(
    start_pods: StartPods, start_router: StartRouter, metrics: Metrics
) -> None:
    (pod,) = start_pods(1)
    client = start_router(static_config([pod], limit_concurrency=LIMIT,
                                                access_log=False), metrics=metrics)
    port = int(client.base_url.port or 0)
    opened: list[socket.socket] = []
    try:
        # Held open at the pod, unanswered; uvicorn counts the next connection too, so with
        # these it refuses every new request: the limit is reached.
        opened += send_requests(port, "/hold", LIMIT - 1)
        eventually(lambda: pod.app.hits == LIMIT - 1)
        assert client.get("/ready").status_code == 503
        answers = []
        for _ in range(10):
            opened += send_requests(port, "/", 50)  # a burst, still arriving while probed
            answers.append(admin(metrics, "/ready", manifest_timeout("readinessProbe")))
            answers.append(admin(metrics, "/healthz", manifest_timeout("livenessProbe")))
    finally:
        for sock in opened:
            sock.close()
    assert [answer.status_code for answer in answers] == [200] * 20
    assert answers[0].json() == {"status": "ready", "pods": 1}
    assert answers[1].json()["status"] == "ok"


def test_admin_healthz_and_ready_fail_while_the_serving_loop_is_wedged(
    start_pods: StartPods, start_router: StartRouter, metrics: Metrics,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(probes, "STALL", 1.0)  # the test waits for a stall this long
    source = Source(start_pods(1))
    client = start_router(static_config([]), source=source, metrics=metrics)
    assert client.get("/healthz").status_code == 200
    assert admin(metrics, "/healthz").status_code == 200
    assert source.loop is not None
    release = threading.Event()
    source.loop.call_soon_threadsafe(release.wait, 30)  # the loop runs nothing else meanwhile
    try:
        eventually(lambda: admin(metrics, "/healthz").status_code == 503)
        answer = admin(metrics, "/healthz")
        assert answer.json()["status"] == "event loop stalled"
        assert answer.json()["heartbeat_age"] > 1.0
        # Readiness too: the traffic port cannot answer, so the Service must stop sending
        # clients here (it kept saying ready until liveness restarted the router).
        assert admin(metrics, "/ready").json() == {"status": "not ready",
                                                   "reason": "event loop stalled"}
        with pytest.raises(httpx.TimeoutException):  # the main port cannot answer at all
            client.get("/healthz", timeout=0.5)
    finally:
        release.set()
    eventually(lambda: admin(metrics, "/healthz").status_code == 200)
    assert client.get("/healthz").json() == {"status": "ok"}
    assert admin(metrics, "/ready").status_code == 200


def test_admin_ready_fails_before_start_up_before_the_first_sync_and_on_drain(
    start_pods: StartPods, start_router: StartRouter, metrics: Metrics
) -> None:
    source = Source(start_pods(1))
    Router(static_config([]), source=source, metrics=metrics)  # not started
    assert admin(metrics, "/ready").json() == {"status": "not ready", "reason": "starting"}
    assert admin(metrics, "/healthz").status_code == 503

    source.synced = False
    client = start_router(static_config([]), source=source, metrics=metrics)
    not_synced = {"status": "not ready", "reason": "pod list not synced yet"}
    for answer in (admin(metrics, "/ready"), admin(metrics, "/readyz"), client.get("/ready")):
        assert answer.status_code == 503
        assert answer.json() == not_synced
    assert admin(metrics, "/healthz").status_code == 200  # alive all the same

    source.synced = True
    assert admin(metrics, "/ready").json() == {"status": "ready", "pods": 1}
    assert client.get("/ready").json() == {"status": "ready", "pods": 1}

    client.app.draining = True  # type: ignore[attr-defined]  # what SIGTERM sets
    for answer in (admin(metrics, "/ready"), client.get("/ready")):
        assert answer.status_code == 503
        assert answer.json() == {"status": "not ready", "reason": "shutting down"}
    assert "warmpool_router_requests_total" in admin(metrics, "/metrics").text


def test_supervisor_probes_ask_every_worker(start_pods: StartPods) -> None:
    pods = start_pods(2)
    listed = ",".join(f"{pod.ip}:{pod.port}" for pod in pods)
    port = free_port()  # the supervisor binds it itself
    router = RouterProcess(["--pods", listed, "--workers", "2", "--metrics-port", str(port),
                            "--drain-grace", "5"])

    def probe(path: str) -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5)

    try:
        eventually(lambda: probe("/ready").status_code == 200, timeout=30)
        assert probe("/ready").json() == {"status": "ready", "pods": 2}
        assert probe("/healthz").json() == {"status": "ok", "workers": 2}

        worker = next(child for child in psutil.Process(router.process.pid).children()
                      if "spawn_main" in " ".join(child.cmdline()))
        worker.send_signal(signal.SIGSTOP)  # alive, answering nothing
        try:
            answer = probe("/healthz")
            assert answer.status_code == 503
            assert answer.json()["reason"].startswith("worker ")
        finally:
            worker.send_signal(signal.SIGCONT)
        eventually(lambda: probe("/healthz").status_code == 200)

        router.process.send_signal(signal.SIGTERM)  # each worker drains: /ready fails at once
        eventually(lambda: probe("/ready").status_code == 503)
        assert "shutting down" in probe("/ready").json()["reason"]
    finally:
        assert router.stop() == 0


def test_the_supervisor_numbers_workers_as_their_logs_do_whatever_order_they_started_in():
    """A probe's `worker N: ...` is worker-N of the log lines: the ports are kept by the
    worker's number, not in the order the workers happened to report them."""
    reports: multiprocessing.SimpleQueue[tuple[int, int]] = (
        multiprocessing.get_context("spawn").SimpleQueue())
    ports = WorkerPorts(reports)
    reports.put((1, 2001))  # worker-1 was ready first
    assert ports() == [2001]  # `gathered`: "1 of 2 workers started"
    reports.put((0, 2000))
    assert ports() == [2000, 2001]
    assert ports() == [2000, 2001]
