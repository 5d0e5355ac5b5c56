"""The round-robin rule: which pods a pool request tries, and in what order."""

from __future__ import annotations

import itertools

from router.pods import Pod


class RoundRobin:
    """An atomic counter picks the start index; attempt i goes to pods[(start + i) % n].

    `itertools.count` advances in one C call, so concurrent requests (and threads) never
    share a start index. Each pod appears at most once per request.
    """

    def __init__(self, max_attempts: int = 0) -> None:
        self._counter = itertools.count()
        self._max_attempts = max_attempts

    def order(self, pods: tuple[Pod, ...]) -> list[Pod]:
        n = len(pods)
        if n == 0:
            return []
        start = next(self._counter) % n
        attempts = min(self._max_attempts, n) if self._max_attempts else n
        if attempts == n:
            return [*pods[start:], *pods[:start]]
        return [pods[(start + i) % n] for i in range(attempts)]
