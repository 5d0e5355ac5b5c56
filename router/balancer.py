"""The round-robin rule: which pods a pool request tries, and in what order."""

from __future__ import annotations

import itertools

from router.health import Health
from router.pods import Pod


class RoundRobin:
    """An atomic counter picks the start index; attempt i goes to pods[(start + i) % n].

    `itertools.count` advances in one C call, so concurrent requests (and threads) never
    share a start index. Each pod appears at most once per request.

    With `health`, the pods cooling down (router/health.py) go last, soonest to recover
    first, and the rule above runs over the others: start = counter % (pods not cooling),
    so the healthy pods keep exactly even shares. Merely stepping over a cooling pod at
    its index would hand its turns to the pod after it, doubling that one's load.
    """

    def __init__(self, max_attempts: int = 0, health: Health | None = None) -> None:
        self._counter = itertools.count()
        self._max_attempts = max_attempts
        self._health = health

    def order(self, pods: tuple[Pod, ...]) -> list[Pod]:
        count = next(self._counter)
        healthy, resting = self._health.split(pods) if self._health is not None else (pods, [])
        n = len(healthy)
        start = count % n if n else 0
        order = [*healthy[start:], *healthy[:start], *resting]
        return order[:self._max_attempts] if self._max_attempts else order
