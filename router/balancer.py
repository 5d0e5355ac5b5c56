"""The round-robin rule: which pods a pool request tries, and in what order."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable

from router.health import Health
from router.pods import Pod

# Where the round robin over a new pod list of this many pods starts.
FirstIndex = Callable[[int], int]


class RoundRobin:
    """An atomic counter picks the start index; attempt i goes to pods[(start + i) % n].

    `itertools.count` advances in one C call, so concurrent requests never share a start
    index. Each pod appears at most once per request.

    With `health`, the pods cooling down (router/health.py) go last, soonest to recover
    first, and the rule above runs over the others: start = counter % (pods not cooling),
    so the healthy pods keep exactly even shares. Merely stepping over a cooling pod at
    its index would hand its turns to the pod after it, doubling that one's load.

    Many processes over one pool (replicas, `--workers`) each run this rule with a counter
    of their own and no shared state, so two things keep them apart:

    - The start over each new pod list is `first(n)`, by default random per process
      (Envoy's round robin starts at a random host too): processes started together do
      not all send their first request to the first pod and walk the list in lockstep.
    - After a request met a busy (or failed) pod and was served by a later one, the next
      request starts right after the pod that served (`served`), not at the counter:
      the pod skipped is taken by another process, which is likely to be there again
      next time, while the ones after the server were just free. Without this, two
      processes whose counters meet keep colliding, each one 503 round trip per request.
      A process that never meets a busy pod (one router alone) is not moved at all.
    """

    def __init__(self, max_attempts: int = 0, health: Health | None = None,
                 first: FirstIndex = random.randrange) -> None:
        self._counter = itertools.count()
        self._max_attempts = max_attempts
        self._health = health
        self._first = first
        self._offset = 0  # added to the counter: the random start, and each move
        self._listed: tuple[Pod, ...] = ()
        self._places: dict[Pod, int] = {}  # index in the pod list
        self._after: Pod | None = None  # start after this pod next time (`served`)

    def order(self, pods: tuple[Pod, ...]) -> list[Pod]:
        count = next(self._counter)
        if pods is not self._listed:
            self._relist(pods, count)
        count += self._offset
        healthy, resting = self._health.split(pods) if self._health is not None else (pods, [])
        n = len(healthy)
        start = count % n if n else 0
        if self._after is not None and n:
            start = self._following(self._after, healthy)
            self._offset += start - count % n  # and the requests after it go on from there
            self._after = None
        order = [*healthy[start:], *healthy[:start], *resting]
        return order[:self._max_attempts] if self._max_attempts else order

    def served(self, pod: Pod) -> None:
        """`pod` served a request after the pods before it in its order were busy or
        failed: the next request starts after it."""
        self._after = pod

    def _following(self, pod: Pod, healthy: tuple[Pod, ...]) -> int:
        """The index in `healthy` of the first pod after `pod` in the list, wrapping round
        (0 if `pod` left the list, or none of `healthy` comes after it)."""
        place = self._places.get(pod, len(self._listed))
        return next((i for i, other in enumerate(healthy) if self._places[other] > place), 0)

    def _relist(self, pods: tuple[Pod, ...], count: int) -> None:
        """A new pod list starts at `first`; the same pods listed again (a refresh) change
        nothing, so one router's shares stay exactly even."""
        if pods != self._listed and pods:
            self._offset = self._first(len(pods)) - count
            self._places = {pod: index for index, pod in enumerate(pods)}
            self._after = None
        self._listed = pods
