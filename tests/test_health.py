"""Passive health against real pods: what cools down, for how long, what ends it, that the
round robin stays even around it, and what an operator sees (metric, access log, warning).
The cooldowns run on a clock the test moves (tests/clock.py): nothing waits for them."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from router.balancer import RoundRobin
from router.health import BUSY_COOLDOWN, FAILED_COOLDOWN, WARN_INTERVAL, Health
from router.logs import AccessLog
from router.metrics import Metrics
from router.observe import Cause, NullObserver
from router.pods import Pod
from tests.clock import ManualClock
from tests.conftest import StartPods, StartRouter, first_pod, scrape, static_config, value
from tests.rawpod import RawPod
from tests.rawpod import resetting as reset_each_request


@pytest.fixture
def resetting() -> Iterator[RawPod]:
    pod = RawPod("pod-r", "127.0.0.9", reset_each_request)
    yield pod
    pod.stop()


def statuses(client: httpx.Client, count: int) -> list[int]:
    return [client.get("/").status_code for _ in range(count)]


def test_a_pod_that_fails_mid_request_gets_nothing_until_its_cooldown_ends(
    start_pods: StartPods, start_router: StartRouter, resetting: RawPod
) -> None:
    clock = ManualClock()
    client = start_router(static_config([*start_pods(2), resetting]), clock=clock)

    # The third request starts at pod-r, which takes it and resets: final (it may have acted).
    assert statuses(client, 30).count(502) == 1
    assert resetting.connections == 1
    clock.advance(FAILED_COOLDOWN)  # over: its turn comes round once in three requests
    assert statuses(client, 3).count(502) == 1
    assert resetting.connections == 2
    clock.advance(FAILED_COOLDOWN)  # half of the doubled cooldown
    assert statuses(client, 3) == [200] * 3
    assert resetting.connections == 2
    clock.advance(FAILED_COOLDOWN)
    assert statuses(client, 3).count(502) == 1
    assert resetting.connections == 3


def test_a_pod_that_refuses_connections_costs_one_connect_per_cooldown(
    start_pods: StartPods, start_router: StartRouter, metrics: Metrics
) -> None:
    pods = start_pods(3)
    pods[2].stop()
    clock = ManualClock()
    client = start_router(static_config(pods), clock=clock, metrics=metrics)

    def connect_errors() -> float:
        samples = scrape(metrics.port)
        return value(samples, "warmpool_router_upstream_attempts_total", outcome="connect_error")

    assert statuses(client, 30) == [200] * 30  # the refused attempt moves on to the next pod
    assert connect_errors() == 1
    # The 27 requests after the one that met the refusal passed over pod-2.
    samples = scrape(metrics.port)
    assert value(samples, "warmpool_router_pod_skips_total", reason="failed") == 27
    assert value(samples, "warmpool_router_pod_skips_total", reason="busy") == 0
    clock.advance(FAILED_COOLDOWN)
    assert statuses(client, 3) == [200] * 3
    assert connect_errors() == 2
    clock.advance(FAILED_COOLDOWN)  # half of the doubled cooldown
    assert statuses(client, 3) == [200] * 3
    assert connect_errors() == 2


def test_an_always_busy_pod_gets_one_request_per_cooldown(
    start_pods: StartPods, start_router: StartRouter
) -> None:
    pods = start_pods(3)
    pods[1].app.mode = "busy"
    clock = ManualClock()
    client = start_router(static_config(pods), clock=clock)

    assert statuses(client, 30) == [200] * 30
    assert pods[1].app.hits == 1
    clock.advance(BUSY_COOLDOWN)
    assert statuses(client, 3) == [200] * 3
    assert pods[1].app.hits == 2
    clock.advance(BUSY_COOLDOWN)  # half of the doubled cooldown
    assert statuses(client, 3) == [200] * 3
    assert pods[1].app.hits == 2
    clock.advance(BUSY_COOLDOWN * 1.5)
    assert statuses(client, 3) == [200] * 3
    assert pods[1].app.hits == 3


def test_a_success_ends_the_cooldown_and_its_doubling(
    start_pods: StartPods, start_router: StartRouter
) -> None:
    pods = start_pods(3)
    busy = pods[1].app
    busy.mode = "busy"
    clock = ManualClock()
    skips = Skips()
    client = start_router(static_config(pods), clock=clock, observer=skips)

    assert statuses(client, 3) == [200] * 3
    assert busy.hits == 1
    clock.advance(BUSY_COOLDOWN)
    busy.mode = "ok"
    served = [client.get("/").json()["pod"] for _ in range(3)]
    assert "pod-1" in served  # back in the rotation
    busy.mode = "busy"
    hits = busy.hits
    assert statuses(client, 3) == [200] * 3
    assert busy.hits == hits + 1  # one 503, then it cools down again
    # Without the reset this would be the second failure in a row: a 0.2 s cooldown.
    clock.advance(BUSY_COOLDOWN)
    skips.causes.clear()
    assert statuses(client, 3) == [200] * 3
    assert skips.causes == []  # pod-1 cools down no more: no request passed it over


def test_when_every_pod_cools_down_each_is_still_tried(
    start_pods: StartPods, start_router: StartRouter
) -> None:
    pods = start_pods(3)
    for pod in pods:
        pod.app.mode = "busy"
    client = start_router(static_config(pods))

    assert statuses(client, 2) == [503, 503]
    assert [pod.app.hits for pod in pods] == [2, 2, 2]
    for pod in pods:
        pod.app.mode = "ok"
    assert statuses(client, 3) == [200] * 3  # cooling down does not keep a pod from serving


def test_pinned_requests_neither_skip_a_cooling_pod_nor_cool_one_down(
    start_pods: StartPods, start_router: StartRouter
) -> None:
    pods = start_pods(2)
    pods[0].app.mode = "busy"
    client = start_router(static_config(pods))
    assert client.get("/").json()["pod"] == "pod-1"  # pod-0 answered 503: it cools down
    pods[0].app.mode = "ok"

    def pinned(name: str) -> httpx.Response:
        return client.get("/", headers={"X-Sandbox-ID": name, "X-Sandbox-Namespace": "default"})

    assert pinned("pod-0").json()["pod"] == "pod-0"
    pods[1].app.mode = "busy"
    assert pinned("pod-1").status_code == 503  # the sandbox's own answer, relayed
    pods[1].app.mode = "ok"
    # Only pod-0 cools down for the pool: had the pinned 503 cooled pod-1 too, pod-0 (the
    # sooner to recover) would come first.
    assert [client.get("/").json()["pod"] for _ in range(2)] == ["pod-1", "pod-1"]


def test_a_timeout_the_client_shortened_cools_no_pod_down(
    start_pods: StartPods, start_router: StartRouter
) -> None:
    """`X-Sandbox-Timeout` is the client's deadline, not a sign of the pod's health: two
    cheap requests with a tiny one used to cool both pods and send all traffic to one."""
    pods = start_pods(2)
    client = start_router(static_config(pods))
    shortened = {"X-Sandbox-Timeout": "0.05"}
    assert [client.get("/slow?seconds=0.5", headers=shortened).status_code
            for _ in range(2)] == [504, 504]
    assert sorted(client.get("/").json()["pod"] for _ in range(4)) == ["pod-0", "pod-0",
                                                                        "pod-1", "pod-1"]


def test_one_router_stays_exactly_even_around_a_dead_pod(
    start_pods: StartPods, start_router: StartRouter
) -> None:
    pods = start_pods(4)
    pods[1].stop()
    live = [pods[0], pods[2], pods[3]]
    client = start_router(static_config(pods))
    assert statuses(client, 4) == [200] * 4  # one of these met pod-1 refusing
    before = [pod.app.hits for pod in live]

    with ThreadPoolExecutor(16) as workers:
        answers = list(workers.map(lambda _: client.get("/").status_code, range(300)))

    assert answers == [200] * 300
    assert [pod.app.hits - hits for pod, hits in zip(live, before, strict=True)] == [100] * 3


def test_a_failed_pool_request_names_the_last_pod_tried(
    start_pods: StartPods, start_router: StartRouter, resetting: RawPod
) -> None:
    busy, dead = start_pods(2)
    busy.app.mode = "busy"
    dead.stop()
    stream = io.StringIO()
    access = AccessLog(stream)
    access.start()
    try:
        broken = start_router(static_config([resetting]), observer=access)
        assert broken.get("/").status_code == 502
        unavailable = start_router(static_config([busy, dead]), observer=access)
        assert unavailable.get("/").status_code == 503
    finally:
        access.stop()
    lines = stream.getvalue().splitlines()
    assert [(e["status"], e["pod"], e["namespace"], e["attempts"])
            for e in map(json.loads, lines)] == [
        (502, "pod-r", "default", 1),
        (503, "pod-1", "default", 2),  # pod-0 busy, then pod-1 refused: the last one tried
    ]


def test_each_failing_pod_gets_a_warning_at_most_every_ten_seconds(
    start_pods: StartPods, start_router: StartRouter, caplog: pytest.LogCaptureFixture
) -> None:
    pods = start_pods(2)
    pods[1].stop()
    clock = ManualClock()
    client = start_router(static_config(pods), clock=clock)
    caplog.set_level(logging.WARNING, logger="router.health")

    # Each round: the cooldown is over and two requests meet the dead pod exactly once.
    for wait in (0, FAILED_COOLDOWN, 2 * FAILED_COOLDOWN, 4 * FAILED_COOLDOWN):
        clock.advance(wait)
        assert statuses(client, 2) == [200, 200]
    assert clock.now - 1000 < WARN_INTERVAL
    clock.advance(8 * FAILED_COOLDOWN)
    assert statuses(client, 2) == [200, 200]

    lines = [r.getMessage() for r in caplog.records if r.name == "router.health"]
    address = f"default/pod-1 at {pods[1].ip}:{pods[1].port} failed: ConnectFailed: "
    assert len(lines) == 2
    assert all(address in line and "ConnectionRefusedError" in line for line in lines)
    assert "more failures" not in lines[0]
    assert lines[1].endswith("; 3 more failures since the last line")


# The state rules on their own, with the balancer that reads them.


class Skips(NullObserver):
    def __init__(self) -> None:
        self.causes: list[Cause] = []

    def pod_skipped(self, cause: Cause) -> None:
        self.causes.append(cause)


def pool(count: int) -> tuple[Pod, ...]:
    return tuple(Pod(f"p{i}", "ns", f"10.0.0.{i}", 80) for i in range(count))


def names(order: list[Pod]) -> list[str]:
    return [pod.name for pod in order]


def resting(health: Health, pods: tuple[Pod, ...]) -> list[Pod]:
    return health.split(pods)[1]


def test_cooling_pods_go_last_soonest_to_recover_first() -> None:
    clock = ManualClock()
    skips = Skips()
    health = Health(skips, clock)
    balancer = RoundRobin(first=first_pod, health=health)
    pods = pool(4)
    assert names(balancer.order(pods)) == ["p0", "p1", "p2", "p3"]
    health.failed(pods[0], "failed")  # until +1 s
    health.failed(pods[2], "busy")  # until +0.1 s

    assert names(balancer.order(pods)) == ["p3", "p1", "p2", "p0"]
    assert names(balancer.order(pods)) == ["p1", "p3", "p2", "p0"]
    assert skips.causes == ["busy", "failed"] * 2
    health.failed(pods[1], "failed")
    health.failed(pods[3], "failed")
    skips.causes.clear()
    # Everyone cools down: each is tried, none counts as passed over.
    assert names(balancer.order(pods)) == ["p2", "p0", "p1", "p3"]
    assert skips.causes == []
    clock.advance(FAILED_COOLDOWN)
    assert names(balancer.order(pods)) == ["p0", "p1", "p2", "p3"]


def test_failures_in_flight_together_are_one_failure() -> None:
    clock = ManualClock()
    health = Health(NullObserver(), clock)
    pods = pool(2)
    resting(health, pods)
    for _ in range(50):  # the requests that were out when the pod died
        health.failed(pods[0], "failed")
    clock.advance(FAILED_COOLDOWN)
    assert resting(health, pods) == []


def test_cooldowns_double_up_to_their_cap() -> None:
    clock = ManualClock()
    health = Health(NullObserver(), clock)
    pods = pool(2)
    resting(health, pods)
    for cooldown in (0.1, 0.2, 0.4, 0.8, 1.0, 1.0):
        health.failed(pods[1], "busy")
        clock.advance(cooldown * 0.9)
        assert resting(health, pods) == [pods[1]]
        clock.advance(cooldown * 0.2)
        assert resting(health, pods) == []
    health.failed(pods[1], "failed")  # the count goes on, on the longer scale (to 30 s)
    clock.advance(FAILED_COOLDOWN * 16 * 0.9)
    assert resting(health, pods) == [pods[1]]


def test_pods_that_leave_the_list_are_forgotten() -> None:
    health = Health(NullObserver(), ManualClock())
    pods = pool(3)
    resting(health, pods)
    health.failed(pods[2], "failed")
    assert resting(health, pods) == [pods[2]]
    assert resting(health, pods[:2]) == []
    assert resting(health, pods) == []  # back in a later list: a fresh start
    health.failed(Pod("gone", "ns", "10.0.0.9", 80), "failed")  # left while its request ran
    assert resting(health, pods) == []
