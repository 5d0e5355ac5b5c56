"""The round-robin rule in isolation: start index, attempt order, attempt limit."""

from __future__ import annotations

from router.balancer import RoundRobin
from router.pods import Pod
from tests.conftest import first_pod


def pods(count: int) -> tuple[Pod, ...]:
    return tuple(Pod(f"p{i}", "ns", f"10.0.0.{i}", 80) for i in range(count))


def names(order: list[Pod]) -> list[str]:
    return [pod.name for pod in order]


def test_each_request_starts_one_further_and_wraps_around():
    balancer = RoundRobin(first=first_pod)
    pool = pods(3)
    assert [names(balancer.order(pool)) for _ in range(4)] == [
        ["p0", "p1", "p2"],
        ["p1", "p2", "p0"],
        ["p2", "p0", "p1"],
        ["p0", "p1", "p2"],
    ]


def test_max_attempts_limits_the_order():
    balancer = RoundRobin(first=first_pod, max_attempts=2)
    pool = pods(4)
    assert [names(balancer.order(pool)) for _ in range(4)] == [
        ["p0", "p1"], ["p1", "p2"], ["p2", "p3"], ["p3", "p0"],
    ]


def test_max_attempts_above_the_pool_size_tries_each_pod_once():
    assert names(RoundRobin(first=first_pod, max_attempts=9).order(pods(2))) == ["p0", "p1"]


def test_empty_pool_has_no_attempts():
    assert RoundRobin(first=first_pod).order(()) == []
