"""The round-robin rule in isolation: start index, attempt order, attempt limit, and the
rules that keep many routers over one pool apart."""

from __future__ import annotations

from router.balancer import SHARED_FOR, RoundRobin
from router.pods import Pod
from tests.clock import ManualClock
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


def test_a_new_pod_list_starts_at_first_and_a_refresh_of_the_same_pods_does_not():
    starts = iter([2, 0])
    balancer = RoundRobin(first=lambda size: next(starts))
    pool = pods(3)
    assert names(balancer.order(pool))[0] == "p2"
    assert names(balancer.order(tuple(pool)))[0] == "p0"  # an equal list: no new start
    assert names(balancer.order(pool[:2]))[0] == "p0"  # a new list: `first` again


def test_a_shared_pod_answering_busy_makes_requests_keep_to_the_pods_just_used():
    clock = ManualClock()
    balancer = RoundRobin(first=first_pod, clock=clock)
    pool = pods(4)
    for pod in pool[:2]:  # p0, then p1, serve a request each
        assert balancer.order(pool)[0] == pod
        balancer.served(pod)
        balancer.finished(pod)
    balancer.busy(pool[3])  # never served this router: no sign of sharing
    assert names(balancer.order(pool))[0] == "p2"

    balancer.busy(pool[0])  # served it before: others use it too
    assert names(balancer.order(pool)) == ["p1", "p2", "p3", "p0"]  # the last freed
    balancer.served(pool[1])
    assert names(balancer.order(pool))[0] == "p0"  # p1 is busy with our own request
    balancer.served(pool[0])
    assert names(balancer.order(pool))[0] == "p1"  # none free: the counter's turn
    balancer.finished(pool[1])
    assert names(balancer.order(pool))[0] == "p1"
    clock.advance(SHARED_FOR)  # no busy answer for that long: round robin again, its
    assert names(balancer.order(pool))[0] == "p3"  # counter having gone on (8th request)


def test_a_pod_busy_and_later_free_is_shared_too():
    balancer = RoundRobin(first=first_pod, clock=ManualClock())
    pool = pods(3)
    assert names(balancer.order(pool))[0] == "p0"
    balancer.busy(pool[0])
    balancer.served(pool[1])
    balancer.finished(pool[1])
    assert names(balancer.order(pool))[0] == "p1"  # one busy answer proves nothing
    balancer.served(pool[0])  # the pod that was busy serves us: others use it too
    balancer.finished(pool[0])
    assert names(balancer.order(pool))[0] == "p0"  # the last freed, not the counter's p2
