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
  requests, the next fails at once.

Answers are the caller's to keep (`cached` reads them), since what an answer is worth, and
for how long, differs between callers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

from cachetools import TTLCache

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

KEPT_FAILURES = 4096


class CallFailed(Exception):
    """The call for this key failed, now or within `failure_ttl`; or too many requests
    wait for a call already."""


class _Failure(str):
    """Why a call failed, as kept: each request raises its own `CallFailed` from it, so no
    exception object (and its traceback's frames) is shared between requests."""


class SharedCalls(Generic[K, V]):
    """See the module. Touched only on its event loop."""

    __slots__ = ("_cached", "_failures", "_pending", "_slots", "_max_waiting", "_waiting")

    def __init__(self, cached: Callable[[K], V | None], slots: int, max_waiting: int,
                 failure_ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._cached = cached
        self._failures: TTLCache[K, _Failure] = TTLCache(KEPT_FAILURES, failure_ttl, clock)
        self._pending: dict[K, asyncio.Future[V | _Failure]] = {}
        self._slots = asyncio.Semaphore(slots)
        self._max_waiting = max_waiting
        self._waiting = 0

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
        """A call for `key` once a slot is free (the wait is cancelled with the request: no
        call then), unless another request's call for it ended or began meanwhile."""
        if self._slots.locked() and self._waiting >= self._max_waiting:
            raise CallFailed("too many requests wait for a call already")
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        started = False
        try:
            known = self._known(key)
            if known is None:
                known = self._pending[key] = asyncio.ensure_future(self._run(key, call))
                started = True  # the call releases the slot as it ends
            return known
        finally:
            if not started:
                self._slots.release()

    async def _run(self, key: K, call: Callable[[], Awaitable[V]]) -> V | _Failure:
        """Holds its slot until the call ends, however long after its requests left. A
        failure is returned, not raised: a call nobody waits for any more is no error."""
        try:
            return await call()
        except Exception as exc:
            failure = self._failures[key] = _Failure(str(exc) or type(exc).__name__)
            return failure
        finally:
            del self._pending[key]
            self._slots.release()

    def close(self) -> None:
        """At shutdown: calls nobody will wait for are not left pending in a closed loop."""
        for call in self._pending.values():
            call.cancel()
