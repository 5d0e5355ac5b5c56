"""Calls that only a thread can make (a DNS lookup, a TokenReview), shared and bounded.

A request can stop waiting for such a call but cannot end it: the thread stays busy until
the call returns, tens of seconds when what it asks has stopped answering. Unbounded, each
request during an outage queued one more call behind the busy threads, and the backlog ran
after the outage, before any new call. So, per `SharedCalls`:

- one call per key at a time, which every request for that key waits on (shielded: a
  request that leaves does not end it for the others);
- a failure is kept `failure_ttl` seconds and raised to every request for that key
  meanwhile: an outage costs a call per key and period, not one per request;
- at most `slots` calls under way (the threads there are): a request for another key
  waits for one to end, and starts none if it leaves first; beyond `max_waiting` such
  requests, the next fails at once;
- a key whose last answer `renews` (a name that resolved, a token approved) within
  `renew_window` is asked again in `renewal_slots` of its own, with a queue of its own.
  Anyone can send new keys (random tokens, random sandbox names), and without this lane
  a flood of them took every slot and waiting place, so each working key failed as its
  cached answer expired: one unauthenticated client locked every caller out.

Answers are the caller's to keep (`cached` reads them), since what an answer is worth, and
for how long, differs between callers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from cachetools import TTLCache

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

KEPT_KEYS = 4096
"""Failures, and keys that renew, remembered (the least recently used go first)."""


class CallFailed(Exception):
    """The call for this key failed, now or within `failure_ttl`; or too many requests
    wait for a call already."""


class _Failure(str):
    """Why a call failed, as kept: each request raises its own `CallFailed` from it, so no
    exception object (and its traceback's frames) is shared between requests."""


@dataclass(frozen=True)
class Bounds:
    """See the module."""

    slots: int
    renewal_slots: int
    max_waiting: int
    failure_ttl: float
    renew_window: float


class _Lane:
    """Slots, and the requests waiting for one."""

    __slots__ = ("slots", "waiting", "max_waiting")

    def __init__(self, slots: int, max_waiting: int) -> None:
        self.slots = asyncio.Semaphore(slots)
        self.waiting = 0
        self.max_waiting = max_waiting


class SharedCalls(Generic[K, V]):
    """See the module. Touched only on its event loop."""

    __slots__ = ("_cached", "_renews", "_failures", "_renewing", "_pending", "_lanes",
                 "_closed")

    def __init__(self, cached: Callable[[K], V | None], bounds: Bounds,
                 renews: Callable[[V], bool] = lambda answer: True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._cached = cached
        self._renews = renews
        self._failures: TTLCache[K, _Failure] = TTLCache(KEPT_KEYS, bounds.failure_ttl, clock)
        self._renewing: TTLCache[K, bool] = TTLCache(KEPT_KEYS, bounds.renew_window, clock)
        self._pending: dict[K, asyncio.Future[V | _Failure]] = {}
        self._lanes = (_Lane(bounds.slots, bounds.max_waiting),
                       _Lane(bounds.renewal_slots, bounds.max_waiting))
        self._closed = False

    async def __call__(self, key: K, call: Callable[[], Awaitable[V]]) -> V:
        """`call()`'s answer for `key`, or the one cached or under way. Raises `CallFailed`."""
        known = self._known(key)
        if known is None:
            known = await self._start(key, call)
        if isinstance(known, asyncio.Future):
            result: V | _Failure = await asyncio.shield(known)
            if isinstance(result, _Failure):
                raise CallFailed(result)
            return result
        return known

    def _known(self, key: K) -> V | asyncio.Future[V | _Failure] | None:
        """The cached answer or the call under way; raises a failure kept."""
        answer = self._cached(key)
        if answer is not None:
            return answer
        failure = self._failures.get(key)
        if failure is not None:
            raise CallFailed(failure)
        return self._pending.get(key)

    async def _start(self, key: K, call: Callable[[], Awaitable[V]]
                     ) -> V | asyncio.Future[V | _Failure]:
        """A call for `key` once a slot of its lane is free (the wait is cancelled with
        the request: no call then), unless another request's call for it ended or began
        meanwhile."""
        lane = self._lanes[key in self._renewing]
        if self._closed or lane.slots.locked() and lane.waiting >= lane.max_waiting:
            raise CallFailed("too many requests wait for a call already")
        lane.waiting += 1
        try:
            await lane.slots.acquire()
        finally:
            lane.waiting -= 1
        started = False
        try:
            known = self._known(key)
            if known is None:
                known = self._pending[key] = asyncio.ensure_future(self._run(key, call, lane))
                started = True  # the call releases the slot as it ends
            return known
        finally:
            if not started:
                lane.slots.release()

    async def _run(self, key: K, call: Callable[[], Awaitable[V]], lane: _Lane
                   ) -> V | _Failure:
        """Holds its slot until the call ends, however long after its requests left. A
        failure is returned, not raised: a call nobody waits for any more is no error.
        A cancellation the call raised itself (its thread pool shut down) is a failure;
        one of this task (`close`) ends it."""
        try:
            answer = await call()
        except Exception as exc:
            return self._failed(key, str(exc) or type(exc).__name__)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            return self._failed(key, "the call was cancelled")
        finally:
            self._pending.pop(key, None)
            lane.slots.release()
        if self._renews(answer):
            self._renewing[key] = True
        return answer

    def _failed(self, key: K, why: str) -> _Failure:
        failure = self._failures[key] = _Failure(why)
        return failure

    def close(self) -> None:
        """At shutdown: no call starts any more, and those under way are not left pending
        in a closed loop (one not started yet never runs its `finally`)."""
        self._closed = True
        pending, self._pending = self._pending, {}
        for call in pending.values():
            call.cancel()
