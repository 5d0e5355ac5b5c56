"""Name lookups for the upstream hop: a pinned sandbox the router has not indexed is reached
by its cluster DNS name, and an operator's `--pods` may name hosts.

Bounded, because a lookup is not the request's to cancel: uvloop hands it to one of
libuv's four threads (`UV_THREADPOOL_SIZE`), where the system resolver holds it until it
answers or gives up, tens of seconds against a DNS server that has stopped answering
(every search domain, both address families, retried). A request's connect timeout
abandons the wait, not the lookup. Unbounded, every request for a name nobody knows,
during a DNS outage, queued another lookup behind the ones holding the threads, and
after the outage the backlog still had to run before a new name was looked up. So:

- one lookup per name at a time, which every request for that name waits on;
- answers kept `ANSWER_SECONDS`, failures `FAILURE_SECONDS` (a name that does not exist
  costs a lookup a second, not one per request);
- at most `MAX_LOOKUPS` lookups under way (libuv's threads); a request for another name
  waits for one to end, within its connect timeout, and starts none if it has left.

nginx's `resolver` caches answers and failures alike, and Envoy's DNS cache bounds its
hosts and pending lookups, for the same reasons."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from cachetools import TTLCache

Lookup = Callable[[str], Awaitable[str]]
"""A host name to one IP address; raises OSError when there is none."""

ANSWER_SECONDS = 10.0
FAILURE_SECONDS = 1.0
MAX_LOOKUPS = 4
"""libuv's thread pool: lookups beyond it would only queue there, out of reach."""
CACHED_NAMES = 4096


class Failure(str):
    """Why a lookup failed (kept `FAILURE_SECONDS`); each request raises its own
    `LookupFailed` from it, so no exception object is shared between requests."""


class LookupFailed(OSError):
    """The name has no address (or the lookup failed) now or within `FAILURE_SECONDS`."""


async def system_lookup(host: str) -> str:
    """The system's resolver (`/etc/hosts`, then DNS, as `/etc/nsswitch.conf` says)."""
    try:
        infos: list[Any] = await asyncio.get_running_loop().getaddrinfo(
            host, None, type=socket.SOCK_STREAM)
    except UnicodeError as exc:  # a label IDNA cannot encode: no such name
        raise LookupFailed(f"{host}: {exc}") from None
    return str(infos[0][4][0])


class Resolver:
    """`lookup`, cached and bounded as the module says. One per upstream client."""

    __slots__ = ("_lookup", "_answers", "_failures", "_pending", "_slots")

    def __init__(self, lookup: Lookup = system_lookup,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._lookup = lookup
        self._answers: TTLCache[str, str] = TTLCache(CACHED_NAMES, ANSWER_SECONDS, clock)
        self._failures: TTLCache[str, Failure] = TTLCache(CACHED_NAMES, FAILURE_SECONDS, clock)
        self._pending: dict[str, asyncio.Future[str | Failure]] = {}
        self._slots = asyncio.Semaphore(MAX_LOOKUPS)

    async def __call__(self, host: str) -> str:
        known = self._known(host)
        if known is None:
            known = await self._start(host)
        if isinstance(known, str):
            return known
        # Shielded: a request that leaves does not end the lookup others wait on.
        result = await asyncio.shield(known)
        if isinstance(result, Failure):
            raise LookupFailed(result)
        return result

    async def _start(self, host: str) -> str | asyncio.Future[str | Failure]:
        """A lookup of `host`, once a slot is free (the wait is cancelled with the request:
        no lookup then), unless another request's ended or began meanwhile."""
        await self._slots.acquire()
        started = False
        try:
            known = self._known(host)
            if known is None:
                known = self._pending[host] = asyncio.ensure_future(self._resolve(host))
                started = True  # the lookup releases the slot as it ends
            return known
        finally:
            if not started:
                self._slots.release()

    def close(self) -> None:
        """At shutdown: lookups nobody will wait for are not left pending in a closed loop."""
        for lookup in self._pending.values():
            lookup.cancel()

    def _known(self, host: str) -> str | asyncio.Future[str | Failure] | None:
        """The cached answer or the lookup under way; raises a cached failure."""
        answer = self._answers.get(host)
        if answer is not None:
            return answer
        failure = self._failures.get(host)
        if failure is not None:
            raise LookupFailed(failure)
        return self._pending.get(host)

    async def _resolve(self, host: str) -> str | Failure:
        """Holds its slot until the lookup ends, however long after its requests left. A
        failure is returned, not raised: a lookup nobody waits for any more is no error."""
        try:
            answer = self._answers[host] = await self._lookup(host)
            return answer
        except OSError as exc:
            failure = self._failures[host] = Failure(str(exc) or f"{host}: no address")
            return failure
        finally:
            del self._pending[host]
            self._slots.release()
