"""A clock for the router's pod cooldowns that only the test moves."""

from __future__ import annotations


class ManualClock:
    """Monotonic seconds that stand still until `advance`: a cooldown ends exactly when the
    test says, however slow the machine is."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
