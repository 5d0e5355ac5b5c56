"""`/metrics` after known traffic: exact counters and labels, scraped over HTTP."""

from __future__ import annotations

import dataclasses
import gc

from router.config import StaticPod
from router.metrics import Metrics, duration_buckets
from tests.conftest import StartPods, StartRouter, scrape, static_config, value


def test_duration_buckets_end_at_the_proxy_timeout() -> None:
    assert duration_buckets(180) == (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                                     30, 60, 120, 180)
    assert duration_buckets(1)[-2:] == (0.5, 1)


def test_counters_after_known_traffic(
    start_pods: StartPods, start_router: StartRouter, metrics: Metrics
) -> None:
    busy, ok = start_pods(2)
    busy.app.mode = "busy"
    dead = StaticPod("pod-9", "127.0.0.9", ok.port)  # nothing listens there
    config = static_config([busy, ok])
    config = dataclasses.replace(config, pods=(*config.pods, dead))
    client = start_router(config, metrics=metrics)

    # Pool (the cooldowns' clock stands still): pod-0 busy then pod-1; pod-0 goes last, so
    # pod-9 refused then pod-1; pod-9 goes last too, and pod-1 serves the rest at once.
    assert [client.get("/").status_code for _ in range(6)] == [200] * 6
    assert client.post("/", content=b"x" * 100).status_code == 200
    pinned = {"X-Sandbox-Namespace": "default"}
    assert client.get("/", headers={**pinned, "X-Sandbox-ID": "pod-1"}).status_code == 200
    assert client.get("/", headers={**pinned, "X-Sandbox-ID": "pod-0"}).status_code == 503
    slow = {**pinned, "X-Sandbox-ID": "pod-1", "X-Sandbox-Timeout": "0.3"}
    assert client.get("/slow?seconds=5", headers=slow).status_code == 504
    assert client.get("/", headers={"X-Sandbox-ID": "Not_A_Label"}).status_code == 400

    samples = scrape(metrics.port)
    requests = "warmpool_router_requests_total"
    assert value(samples, requests, route="pool", method="GET", code="200") == 6
    assert value(samples, requests, route="pool", method="POST", code="200") == 1
    assert value(samples, requests, route="pinned", method="GET", code="200") == 1
    assert value(samples, requests, route="pinned", method="GET", code="503") == 1
    assert value(samples, requests, route="pinned", method="GET", code="504") == 1
    assert value(samples, requests, route="pinned", method="GET", code="400") == 1
    assert sum(v for (name, _), v in samples.items() if name == requests) == 11

    attempts = "warmpool_router_upstream_attempts_total"
    assert {outcome: value(samples, attempts, outcome=outcome)
            for outcome in ("ok", "busy", "connect_error", "timeout", "error")} == {
        "ok": 9, "busy": 1, "connect_error": 1, "timeout": 1, "error": 0}
    assert value(samples, "warmpool_router_retries_total") == 2
    # Passed over: pod-0 by the six pool requests after the first (the POST included),
    # pod-9 by the last five.
    skips = "warmpool_router_pod_skips_total"
    assert value(samples, skips, reason="busy") == 6
    assert value(samples, skips, reason="failed") == 5
    duration = "warmpool_router_request_duration_seconds_count"
    assert value(samples, duration, route="pool") == 7
    assert value(samples, duration, route="pinned") == 4
    bucket = "warmpool_router_request_duration_seconds_bucket"
    assert value(samples, bucket, route="pinned", le="+Inf") == 4
    assert value(samples, bucket, route="pinned", le="0.25") <= 3  # the 504 waited 0.3 s
    assert value(samples, "warmpool_router_request_duration_seconds_sum", route="pinned") >= 0.3
    assert value(samples, "warmpool_router_inflight_requests") == 0
    assert value(samples, "warmpool_router_pool_pods") == 3
    assert value(samples, "warmpool_router_pod_list_age_seconds") == 0
    assert value(samples, "warmpool_router_pod_list_refreshes_total", outcome="ok") == 0
    assert value(samples, "warmpool_router_build_info", version="0.1.0") == 1


def test_no_label_names_a_pod_or_sandbox(
    start_pods: StartPods, start_router: StartRouter, metrics: Metrics
) -> None:
    pods = start_pods(2)
    client = start_router(static_config(pods), metrics=metrics)
    client.get("/")
    client.get("/", headers={"X-Sandbox-ID": "pod-1"})

    labels = {label for _, pairs in scrape(metrics.port) for label in pairs}
    assert {name for name, _ in labels} <= {"route", "method", "code", "outcome", "reason",
                                            "version", "le", "decision", "generation"}
    assert not {value for _, value in labels} & {"pod-0", "pod-1"}


def test_garbage_collector_runs_and_what_they_freed_are_counted(metrics: Metrics) -> None:
    """Read live at each scrape (the router serves in this process here): a collection
    made between two scrapes shows, and so do the objects of a cycle it freed."""
    def counts() -> tuple[float, float]:
        samples = scrape(metrics.port)
        return (value(samples, "warmpool_router_gc_collections_total", generation="2"),
                sum(value(samples, "warmpool_router_gc_collected_objects_total",
                          generation=str(generation)) for generation in range(3)))

    collections, collected = counts()
    cycle: list[object] = []
    cycle.append(cycle)
    del cycle
    gc.collect()
    after_collections, after_collected = counts()
    assert after_collections >= collections + 1
    assert after_collected >= collected + 1
