"""Passive health: a pod that just failed a pool request cools down for a while, and the
round robin (router/balancer.py) puts it behind every other pod until it has.

What counts, from what pool attempts saw (no probes of our own):

- **failed**: the connect was refused or timed out (`ConnectFailed`), or the pod failed
  or timed out after it was sent the request (`UpstreamFailed`, `UpstreamTimeout` of the
  router's own `--proxy-timeout`: a timeout the client shortened with `X-Sandbox-Timeout`
  says nothing about the pod, and counting it would let any client steer the pool). First
  cooldown `FAILED_COOLDOWN` (1 s), doubled by each further failure up to 30 s: a dead pod
  costs one connect attempt per cooldown instead of one per request, and a pod that comes
  back is in use again within one cooldown.
- **busy**: the pod answered 503. A sandbox is busy while it works on one request, which
  may end any moment, so its cooldown is short: `BUSY_COOLDOWN` (0.1 s), doubling to 1 s.
  An always-busy pod costs one round trip a second; a pod that frees up soon after its 503
  is back in the rotation within 0.1 s, and before that it still gets requests when every
  other pod is busy (below).
- Any other answer (a 500 from the sandbox included: that is the sandbox's answer to the
  request, not a sign of the pod's health) is a success and ends the cooldown at once.

Failures that arrive while the pod is already cooling down (the other requests that were
in flight to it when it died) are the same spell and do not double the cooldown again.

A cooling pod is put last, never removed: the request tries the other pods first, in their
even round-robin order, then the cooling ones, soonest to recover first. So when every pod
cools down at once, each is still tried, and a request is answered "all busy" only after
every pod was tried (or `--max-attempts` ran out). Pinned requests never look at any of
this: their target is the sandbox the client named.

Compared with the anchors: nginx's `max_fails=1 fail_timeout=10s` (its default) takes a
server out for a fixed 10 s after one failure, 503 included when `proxy_next_upstream`
lists `http_503`; when every server is out, it resets them all and answers 502 "no live
upstreams" for that request. Envoy's outlier detection ejects a host after 5 consecutive
5xx or gateway failures (`consecutive_5xx`, `consecutive_gateway_failure`) for
`base_ejection_time` (30 s) times the number of ejections, up to `max_ejection_time`
(300 s), and at most `max_ejection_percent` (10%, but always one host) of the cluster;
beyond that, and in its panic mode, it balances over every host. Here one failure is
enough (a refused connect is certain, and the attempt was wasted anyway), the cooldown
starts far shorter because sandboxes restart and free up in seconds, busy gets its own
short scale (neither nginx nor Envoy knows a "busy" answer), and demotion instead of
ejection is the panic mode without a threshold.

State is per process, touched only on the event loop (no lock), keyed by the `Pod` value
(name, namespace, IP, port: a new pod on an old IP starts fresh) and forgotten for pods
that leave the list. Each failing pod also gets a warning line, at most one per pod every
`WARN_INTERVAL` seconds, saying how many more failures there were in between.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from router.errors import ProxyError
from router.logs import Throttle
from router.observe import Cause, Observer
from router.pods import Pod

log = logging.getLogger("router.health")

Clock = Callable[[], float]
# (pods not cooling down, pods cooling down, why each of those cools down)
_Split = tuple[tuple[Pod, ...], list[Pod], list[Cause]]

BUSY_COOLDOWN = 0.1
BUSY_COOLDOWN_MAX = 1.0
FAILED_COOLDOWN = 1.0
FAILED_COOLDOWN_MAX = 30.0
WARN_INTERVAL = 10.0
# (first, longest) cooldown by cause.
COOLDOWNS: dict[Cause, tuple[float, float]] = {
    "busy": (BUSY_COOLDOWN, BUSY_COOLDOWN_MAX),
    "failed": (FAILED_COOLDOWN, FAILED_COOLDOWN_MAX),
}
_MAX_DOUBLINGS = 16  # far past every cap; keeps 2 ** n small


@dataclass(slots=True)
class _Spell:
    """A pod's failures since its last success."""

    cause: Cause
    failures: int = 0
    until: float = 0.0


class Health:
    """Which pods cool down now, from the outcomes the proxy reports."""

    def __init__(self, observer: Observer, clock: Clock = time.monotonic) -> None:
        self._observer = observer
        self._clock = clock
        self._spells: dict[Pod, _Spell] = {}
        self._warnings: Throttle[Pod] = Throttle(WARN_INTERVAL)
        self._listed: tuple[Pod, ...] = ()
        self._members: frozenset[Pod] = frozenset()
        self._split: _Split | None = None  # what `split` last worked out, good until:
        self._split_until = math.inf

    def split(self, pods: tuple[Pod, ...]) -> tuple[tuple[Pod, ...], list[Pod]]:
        """`pods` as (those not cooling down, in list order; those cooling down, soonest to
        recover first). Each cooling pod counts as skipped (the metric) unless every pod
        cools down: then none was passed over. The split is kept until a cooldown ends or
        an outcome changes it, so a request pays for a clock read, not a sort."""
        if pods is not self._listed:
            self._relist(pods)
        if not self._spells:
            return pods, []
        now = self._clock()
        if self._split is None or now >= self._split_until:
            self._split = self._resplit(pods, now)
        healthy, resting, causes = self._split
        if healthy:
            for cause in causes:
                self._observer.pod_skipped(cause)
        return healthy, resting

    def _resplit(self, pods: tuple[Pod, ...], now: float) -> _Split:
        cooling = sorted((spell.until, index, pod)
                         for index, (pod, spell) in enumerate(self._spells.items())
                         if spell.until > now)
        self._split_until = cooling[0][0] if cooling else math.inf
        resting = [pod for _, _, pod in cooling]
        skipped = set(resting)
        healthy = tuple(pod for pod in pods if pod not in skipped) if skipped else pods
        return healthy, resting, [self._spells[pod].cause for pod in resting]

    def succeeded(self, pod: Pod) -> None:
        if self._spells and self._spells.pop(pod, None) is not None:
            self._split = None

    def failed(self, pod: Pod, cause: Cause, error: ProxyError | None = None) -> None:
        """Start or extend `pod`'s cooldown; `error` (a failed attempt, not a 503) is also
        logged, rate limited."""
        if pod not in self._members:  # it left the list while the request was out
            return
        now = self._clock()
        spell = self._spells.get(pod)
        if spell is None:
            spell = self._spells[pod] = _Spell(cause)
        if now >= spell.until:  # a new failure, not one more from the spell under way
            spell.failures = min(spell.failures + 1, _MAX_DOUBLINGS)
        first, longest = COOLDOWNS[cause]
        until = now + min(first * 2 ** (spell.failures - 1), longest)
        if until > spell.until:
            spell.cause, spell.until = cause, until
            self._split = None
        if error is not None:
            self._warn(pod, error, spell.until - now, now)

    def _warn(self, pod: Pod, error: ProxyError, cooldown: float, now: float) -> None:
        held = self._warnings.allow(pod, now)
        if held is None:
            return
        reason = repr(error.__cause__) if error.__cause__ is not None else error.detail
        more = f"; {held} more failures since the last line" if held else ""
        log.warning("pool pod %s/%s at %s:%d failed: %s: %s; it goes last for %.1f s%s",
                    pod.namespace, pod.name, pod.ip, pod.port, type(error).__name__, reason,
                    cooldown, more)

    def _relist(self, pods: tuple[Pod, ...]) -> None:
        """A new pod list: forget what was known of pods that are no longer in it."""
        self._listed = pods
        self._members = frozenset(pods)
        self._split = None
        for pod in [pod for pod in self._spells if pod not in self._members]:
            del self._spells[pod]
        self._warnings.forget(self._members)
