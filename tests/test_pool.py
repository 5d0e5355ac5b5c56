"""Pool routing against real pods: round robin, busy skipping, retries and their limits."""

from __future__ import annotations

import hashlib
import os
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx

from router.body import Budget
from tests.clock import ManualClock
from tests.conftest import StartPods, StartRouter, eventually, static_config
from tests.rawclient import RawClient
from tests.sandbox import Pod


def test_round_robin_spreads_requests_evenly(start_pods: StartPods, start_router: StartRouter):
    pods = start_pods(3)
    client = start_router(static_config(pods))
    served = Counter(client.get("/").json()["pod"] for _ in range(300))
    assert served == {"pod-0": 100, "pod-1": 100, "pod-2": 100}
    assert [p.app.hits for p in pods] == [100, 100, 100]


def test_round_robin_stays_even_under_concurrency(
    start_pods: StartPods, start_router: StartRouter
):
    pods = start_pods(3)
    client = start_router(static_config(pods))
    with ThreadPoolExecutor(16) as workers:
        statuses = list(workers.map(lambda _: client.get("/").status_code, range(300)))
    assert statuses == [200] * 300
    assert [p.app.hits for p in pods] == [100, 100, 100]


def test_routers_started_together_spread_their_first_requests_and_each_stays_even(
    start_pods: StartPods, start_router: StartRouter
):
    pods = start_pods(4)
    # A router starts its round robin at random (router/balancer.py); seeded here, as
    # three processes would draw: 1, 0 and 2, not all pod-0.
    seeds = (1, 2, 5)
    clients = [start_router(static_config(pods), first=random.Random(seed).randrange)
               for seed in seeds]
    first = [client.get("/").json()["pod"] for client in clients]
    assert first == ["pod-1", "pod-0", "pod-2"]
    for client in clients:
        served = Counter(client.get("/").json()["pod"] for _ in range(40))
        assert served == {"pod-0": 10, "pod-1": 10, "pod-2": 10, "pod-3": 10}


def test_a_pod_busy_after_serving_makes_the_router_keep_to_the_pods_it_just_used(
    start_pods: StartPods, start_router: StartRouter
):
    pods = start_pods(3)
    client = start_router(static_config(pods))  # the cooldowns' clock stands still
    assert [client.get("/").json()["pod"] for _ in range(3)] == ["pod-0", "pod-1", "pod-2"]
    pods[0].app.mode = "busy"  # someone else, another router say, uses pod-0 now
    assert client.get("/").json()["pod"] == "pod-1"
    # pod-0 was free, then busy: shared. pod-1 finished our last request and has none of
    # ours in flight, so the next requests start there, not at the counter's pod-2.
    assert [client.get("/").json()["pod"] for _ in range(3)] == ["pod-1"] * 3


def test_response_names_the_pod_that_served_it(start_pods: StartPods, start_router: StartRouter):
    pods = start_pods(2)
    client = start_router(static_config(pods, namespace="team-a"))
    response = client.get("/")
    assert response.headers["x-sandbox-id"] == response.json()["pod"]
    assert response.headers["x-sandbox-namespace"] == "team-a"


def test_busy_pod_is_skipped(start_pods: StartPods, start_router: StartRouter):
    pods = start_pods(3)
    pods[1].app.mode = "busy"
    client = start_router(static_config(pods))
    served = Counter(client.get("/").json()["pod"] for _ in range(30))
    # The second request finds pod-1 busy and moves on to pod-2; pod-1 then cools down
    # (the test's clock stands still) and the other two share the rest evenly.
    assert served == {"pod-0": 15, "pod-2": 15}
    assert pods[1].app.hits == 1


def test_all_busy_answers_503_after_trying_each_pod_once(
    start_pods: StartPods, start_router: StartRouter
):
    pods = start_pods(3)
    for pod in pods:
        pod.app.mode = "busy"
    client = start_router(static_config(pods))
    response = client.get("/")
    assert response.status_code == 503
    assert response.json() == {"detail": "All warm pool pods are busy."}
    assert int(response.headers["retry-after"]) >= 1
    assert [p.app.hits for p in pods] == [1, 1, 1]


def test_max_attempts_bounds_the_pods_tried(start_pods: StartPods, start_router: StartRouter):
    pods = start_pods(4)
    for pod in pods:
        pod.app.mode = "busy"
    client = start_router(static_config(pods, max_attempts=2))
    assert client.get("/").status_code == 503
    assert sum(p.app.hits for p in pods) == 2


def test_server_error_is_final_and_not_retried(start_pods: StartPods, start_router: StartRouter):
    pods = start_pods(3)
    for pod in pods:
        pod.app.mode = "fail"
    client = start_router(static_config(pods))
    response = client.get("/")
    assert response.status_code == 500
    assert response.text == "boom"
    assert sum(p.app.hits for p in pods) == 1


def test_dead_pod_is_skipped(start_pods: StartPods, start_router: StartRouter):
    pods = start_pods(3)
    pods[0].stop()
    client = start_router(static_config(pods))
    served = Counter(client.get("/").json()["pod"] for _ in range(30))
    assert served == {"pod-1": 15, "pod-2": 15}  # pod-0 refused the first one, then rests


def test_all_pods_unreachable_answers_502(start_pods: StartPods, start_router: StartRouter):
    pods = start_pods(2)
    for pod in pods:
        pod.stop()
    client = start_router(static_config(pods))
    response = client.get("/")
    assert response.status_code == 502
    assert response.json() == {"detail": "Could not connect to any warm pool pod."}


def test_no_pods_answers_503(start_router: StartRouter):
    from router.pods import StaticPodSource

    client = start_router(static_config([]), source=StaticPodSource([]))
    response = client.get("/")
    assert response.status_code == 503
    assert response.json() == {"detail": "No warm pool pods are available."}
    assert "retry-after" in response.headers


def test_small_body_is_replayed_byte_identical_to_the_next_pod(
    start_pods: StartPods, start_router: StartRouter
):
    pods = start_pods(2)
    pods[0].app.mode = "busy"
    client = start_router(static_config(pods))
    body = os.urandom(100_000)
    # Two requests: whichever pod the counter starts at, one request hits pod-0 first.
    answers = [client.post("/upload", content=body).json() for _ in range(2)]
    assert {a["pod"] for a in answers} == {"pod-1"}
    digest = hashlib.sha256(body).hexdigest()
    assert [s.body_sha256 for s in pods[0].app.seen] == [digest]
    assert [s.body_sha256 for s in pods[1].app.seen] == [digest, digest]


def test_body_over_the_retry_limit_streams_and_is_not_replayed(
    start_pods: StartPods, start_router: StartRouter
):
    pods = start_pods(2)
    pods[0].app.mode = "busy"
    pods[1].app.mode = "busy"
    client = start_router(static_config(pods, retry_body_limit=1024))
    response = client.post("/upload", content=os.urandom(4096))
    # The busy pod's own answer is relayed: the body is gone and cannot go to another pod.
    assert response.status_code == 503
    assert response.json() == {"detail": "busy"}
    assert sum(p.app.hits for p in pods) == 1


def budgeted(start_pods: StartPods, start_router: StartRouter
             ) -> tuple[list[Pod], httpx.Client, Budget, int]:
    """Two pods, the first busy, behind a router whose --retry-body-budget is 2000 bytes:
    the pods, a client, the budget itself and the router's port."""
    pods = start_pods(2)
    pods[0].app.mode = "busy"
    client = start_router(static_config(pods, retry_body_budget=2000))
    port = client.base_url.port
    assert port is not None
    return pods, client, client.app._proxy._retry_budget, port  # type: ignore[attr-defined]


def test_bodies_kept_for_a_retry_are_bounded_all_together(
    start_pods: StartPods, start_router: StartRouter
):
    """Two uploads sent all but their last bytes hold the whole --retry-body-budget (a
    client needs no pod for that, and a byte before each --body-timeout holds it on): a
    third body is not kept but streamed, so a busy pod's answer is final. The share of a
    request that ends, however it ends, goes back."""
    pods, client, budget, port = budgeted(start_pods, start_router)
    stalled = [RawClient(port) for _ in range(2)]
    for upload in stalled:
        upload.send(b"POST / HTTP/1.1\r\nHost: r\r\nContent-Length: 1000\r\n\r\n" + b"x" * 999)
    eventually(lambda: budget.left == 2)  # both bodies are being kept
    response = client.post("/upload", content=os.urandom(100))
    assert response.status_code == 503
    assert response.json() == {"detail": "busy"}
    assert pods[1].app.hits == 0
    for upload in stalled:
        upload.close()  # the client leaves: its share goes back
    eventually(lambda: budget.left == 2000)
    assert client.post("/upload", content=os.urandom(100)).json()["pod"] == "pod-1"
    eventually(lambda: budget.left == 2000)  # a kept body's share is back once answered


def test_a_body_only_declared_holds_none_of_the_retry_budget(
    start_pods: StartPods, start_router: StartRouter
):
    """The budget bounds the bytes held, so it is taken as they arrive: a head declaring
    the whole budget, then a byte (again before each --body-timeout), held it all, and a
    few such connections, holding nothing, made every other body stream, each busy pod's
    503 the client's answer."""
    pods, client, budget, port = budgeted(start_pods, start_router)
    declared = RawClient(port)
    declared.send(b"POST / HTTP/1.1\r\nHost: r\r\nContent-Length: 2000\r\n\r\nx")
    eventually(lambda: budget.left < 2000)  # its body is being kept
    assert client.post("/upload", content=os.urandom(100)).json()["pod"] == "pod-1"
    declared.close()
    eventually(lambda: budget.left == 2000)


def test_chunked_body_streams_to_the_first_pod(start_pods: StartPods, start_router: StartRouter):
    pods = start_pods(2)
    client = start_router(static_config(pods))
    parts = [os.urandom(10_000) for _ in range(5)]
    answer = client.post("/upload", content=iter(parts)).json()
    assert answer["body_bytes"] == 50_000
    assert answer["body_sha256"] == hashlib.sha256(b"".join(parts)).hexdigest()


def test_pod_connections_are_reused_busy_answers_included(
    start_pods: StartPods, start_router: StartRouter
):
    pods = start_pods(3)
    pods[1].app.mode = "busy"
    clock = ManualClock()
    client = start_router(static_config(pods), clock=clock)
    for _ in range(60):  # the busy pod's cooldown is over before each request
        clock.advance(60)
        assert client.get("/").status_code == 200
    # One connection per pod for sequential requests: each pod sees a single peer port,
    # the busy one too (its small 503 is read to the end and the connection kept).
    assert [len({seen.peer_port for seen in pod.app.seen}) for pod in pods] == [1, 1, 1]
    assert [pod.app.hits for pod in pods] == [20, 20, 40]
