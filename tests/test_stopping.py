"""Stopping the real command: a second signal, a grace window longer than the budget, and
budgets in fractions of a second. Each test holds a request at a pod that answers only
after a minute, so what ends it is the router's drain, and when, is what the test sees."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest

from tests.conftest import StartPods, eventually
from tests.process import RouterProcess
from tests.sandbox import Pod


class HeldRequest:
    """A GET the pod holds for a minute, sent from a thread; records its answer and the
    moment it came."""

    def __init__(self, router: RouterProcess, pod: Pod) -> None:
        self.answer: httpx.Response | None = None
        self.answered_at = 0.0
        hits = pod.app.hits
        self._thread = threading.Thread(target=self._send, args=(router.url,))
        self._thread.start()
        eventually(lambda: pod.app.hits == hits + 1)  # it is at the pod now

    def _send(self, url: str) -> None:
        self.answer = httpx.get(url + "/slow?seconds=60", timeout=90)
        self.answered_at = time.monotonic()

    def result(self) -> httpx.Response:
        self._thread.join(timeout=90)
        assert self.answer is not None
        return self.answer


def start(pod: Pod, *options: str) -> RouterProcess:
    return RouterProcess(["--pods", f"{pod.ip}:{pod.port}", *options])


def logged(router: RouterProcess, text: str) -> bool:
    return any(text in line for line in router.lines)


def assert_clean_output(router: RouterProcess) -> None:
    """No traceback and no ERROR line: a drain, even cut short, is a normal end."""
    assert not logged(router, "Traceback"), "".join(router.lines)
    assert not logged(router, '"level": "error"'), "".join(router.lines)


@pytest.mark.parametrize("grace, stage", [("30", "draining"), ("0", "Shutting down")],
                         ids=["in-the-grace-window", "finishing-in-flight"])
def test_a_second_signal_ends_the_drain_at_once_without_a_traceback(
    start_pods: StartPods, grace: str, stage: str
) -> None:
    pod = start_pods(1)[0]
    router = start(pod, "--drain-grace", grace, "--shutdown-timeout", "60")
    held = HeldRequest(router, pod)
    router.process.send_signal(signal.SIGTERM)
    eventually(lambda: logged(router, stage))
    router.process.send_signal(signal.SIGTERM)

    assert router.process.wait(timeout=20) == 0  # long before the 60 s budget
    answer = held.result()
    assert answer.status_code == 503
    assert answer.json() == {"detail": "The router is shutting down."}
    assert_clean_output(router)
    assert logged(router, "second signal: ending the drain now")
    assert logged(router, "Application shutdown complete")  # the app closed, not abandoned


def test_a_grace_window_longer_than_the_budget_is_clipped_to_it(start_pods: StartPods) -> None:
    pod = start_pods(1)[0]
    router = start(pod, "--shutdown-timeout", "1", "--drain-grace", "5")
    assert logged(router, "the grace window is clipped to 1 s")
    held = HeldRequest(router, pod)
    signalled = time.monotonic()
    router.process.send_signal(signal.SIGTERM)

    assert router.process.wait(timeout=20) == 0
    answer = held.result()
    assert answer.status_code == 503
    # Unclipped, the listener alone would have stayed open for 5 s.
    assert held.answered_at - signalled < 5
    assert not logged(router, "Traceback")


def test_fractional_budgets_are_honoured(start_pods: StartPods) -> None:
    """`--shutdown-timeout 2 --drain-grace 0.5`: the held request is cut once the whole 2 s
    are spent, not when a budget truncated to whole seconds runs out (it was at 1.6 s)."""
    pod = start_pods(1)[0]
    router = start(pod, "--shutdown-timeout", "2", "--drain-grace", "0.5")
    held = HeldRequest(router, pod)
    signalled = time.monotonic()
    router.process.send_signal(signal.SIGTERM)

    assert router.process.wait(timeout=20) == 0
    assert held.result().status_code == 503
    assert 2.0 <= held.answered_at - signalled < 4.0
