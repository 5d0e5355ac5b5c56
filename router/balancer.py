"""The round-robin rule: which pods a pool request tries, and in what order."""

from __future__ import annotations

import itertools
import math
import random
import time
from collections.abc import Callable

from router.health import Clock, Health
from router.pods import Pod

# Where the round robin over a new pod list of this many pods starts.
FirstIndex = Callable[[int], int]

# How long after its last sign that other processes send to the same pods (below) a
# process keeps to the pods it has just used.
SHARED_FOR = 10.0


class RoundRobin:
    """An atomic counter picks the start index; attempt i goes to pods[(start + i) % n].

    `itertools.count` advances in one C call, so concurrent requests never share a start
    index. Each pod appears at most once per request.

    With `health`, the pods cooling down (router/health.py) go last, soonest to recover
    first, and the rule above runs over the others: start = counter % (pods not cooling),
    so the healthy pods keep exactly even shares. Merely stepping over a cooling pod at
    its index would hand its turns to the pod after it, doubling that one's load.

    Many processes over one pool (replicas, `--workers`) each run this rule with a counter
    of their own and no shared state, which is what makes them collide:

    - Processes started together would all send their first request to the first pod
      and walk the list in lockstep. So the counter of each new pod list starts at
      `first(n)`, by default random per process, as Envoy's round robin does.
    - Even spread out, they collide: each moves one pod on per request, so two processes
      one pod apart race for the same pod every turn, and which one frees it first is
      down to timing. Three processes on four pods always have two such pairs. Other
      ways of moving on were measured and kept colliding (`python -m bench.spread`,
      75% load, short runs): after a busy answer, continuing after the pod that served,
      or at a random index, wasted 0.01 to 0.6 attempts per request from run to run. So
      once a pod has been both busy and free for this process within `SHARED_FOR`
      seconds (it is shared with other processes, not busy for good), the process keeps,
      for the next `SHARED_FOR` seconds, to the pods it just used: a request starts at
      the pod that most recently finished one of its requests and has none of them in
      flight (it is free for this process, and the others keep to their own pods), else
      at the counter. The processes settle on pods of their own (0.01-0.03 wasted), and
      a lone router, whose pods are never busy unless something else uses them too,
      keeps its exact round robin.

    All of it is per process and touched only on its event loop, like router/health.py.
    """

    def __init__(self, max_attempts: int = 0, health: Health | None = None,
                 first: FirstIndex = random.randrange, clock: Clock = time.monotonic) -> None:
        self._counter = itertools.count()
        self._max_attempts = max_attempts
        self._health = health
        self._first = first
        self._clock = clock
        self._offset = 0  # added to the counter: `first` of the current list
        self._listed: tuple[Pod, ...] = ()
        self._in_flight: dict[Pod, int] = {}  # requests each pod serves now (none: absent)
        self._served: dict[Pod, float] = {}  # when each pod last served this process
        self._busy: dict[Pod, float] = {}  # and last answered it busy
        self._freed: dict[Pod, None] = {}  # pods in the order they last finished a request
        self._shared_until = -math.inf

    def order(self, pods: tuple[Pod, ...]) -> list[Pod]:
        count = next(self._counter)
        if pods is not self._listed:
            self._relist(pods, count)
        healthy, resting = self._health.split(pods) if self._health is not None else (pods, [])
        n = len(healthy)
        start = (count + self._offset) % n if n else 0
        if n and self._shared_until > self._clock():
            start = self._last_freed(healthy, start)
        order = [*healthy[start:], *healthy[:start], *resting]
        return order[:self._max_attempts] if self._max_attempts else order

    def served(self, pod: Pod) -> None:
        """`pod` answers one of this process's requests; `finished` follows."""
        in_flight = self._in_flight
        in_flight[pod] = in_flight.get(pod, 0) + 1
        self._served[pod] = now = self._clock()
        self._shared(pod, self._busy, now)

    def finished(self, pod: Pod) -> None:
        """The request `pod` served has ended."""
        in_flight = self._in_flight
        left = in_flight.get(pod, 0) - 1
        if left > 0:
            in_flight[pod] = left
        else:
            in_flight.pop(pod, None)
        self._freed.pop(pod, None)
        self._freed[pod] = None

    def busy(self, pod: Pod) -> None:
        """`pod` answered busy."""
        self._busy[pod] = now = self._clock()
        self._shared(pod, self._served, now)

    def _shared(self, pod: Pod, then: dict[Pod, float], now: float) -> None:
        """A pod both busy and free for this process within `SHARED_FOR` seconds is
        shared with others (an always-busy pod is not): keep to our pods from now."""
        if now - then.get(pod, -math.inf) < SHARED_FOR:
            self._shared_until = now + SHARED_FOR

    def _last_freed(self, healthy: tuple[Pod, ...], start: int) -> int:
        """The index in `healthy` of the pod that most recently finished a request of
        this process and has none in flight; `start` if there is none."""
        places = {pod: index for index, pod in enumerate(healthy)}
        for pod in reversed(self._freed):
            if pod not in self._in_flight and pod in places:
                return places[pod]
        return start

    def _relist(self, pods: tuple[Pod, ...], count: int) -> None:
        """A new pod list starts at `first`; the same pods listed again (a refresh) change
        nothing, so one router's shares stay exactly even."""
        if pods != self._listed and pods:
            self._offset = self._first(len(pods)) - count
            members = set(pods)
            self._served = {pod: at for pod, at in self._served.items() if pod in members}
            self._busy = {pod: at for pod, at in self._busy.items() if pod in members}
            self._freed = {pod: None for pod in self._freed if pod in members}
        self._listed = pods
