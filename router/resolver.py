"""Name lookups for the upstream hop: a pinned sandbox the router has not indexed is reached
by its cluster DNS name, and an operator's `--pods` may name hosts.

Bounded, because a lookup is not the request's to cancel: uvloop hands it to one of
libuv's four threads (`UV_THREADPOOL_SIZE`), where the system resolver holds it until it
answers or gives up, tens of seconds against a DNS server that has stopped answering
(every search domain, both address families, retried). A request's connect timeout
abandons the wait, not the lookup. Unbounded, every request for a name nobody knows,
during a DNS outage, queued another lookup behind the ones holding the threads, and
after the outage the backlog still had to run before a new name was looked up. So:

one lookup per name at a time, answers kept `ANSWER_SECONDS` and failures
`FAILURE_SECONDS` (a name that does not exist costs a lookup a second, not one per
request), at most `MAX_LOOKUPS` under way (libuv's threads), a request for another name
waiting for one to end within its connect timeout (`router.shared_calls`).

nginx's `resolver` caches answers and failures alike, and Envoy's DNS cache bounds its
hosts and pending lookups, for the same reasons."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from cachetools import TTLCache

from router.shared_calls import CallFailed, SharedCalls

Lookup = Callable[[str], Awaitable[str]]
"""A host name to one IP address; raises OSError when there is none."""

ANSWER_SECONDS = 10.0
FAILURE_SECONDS = 1.0
MAX_LOOKUPS = 4
"""libuv's thread pool: lookups beyond it would only queue there, out of reach."""
MAX_WAITING = 1024
"""Requests for other names waiting for a lookup to end; beyond, a 502 at once."""
CACHED_NAMES = 4096


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

    __slots__ = ("_lookup", "_answers", "_calls")

    def __init__(self, lookup: Lookup = system_lookup,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._lookup = lookup
        self._answers: TTLCache[str, str] = TTLCache(CACHED_NAMES, ANSWER_SECONDS, clock)
        self._calls: SharedCalls[str, str] = SharedCalls(
            self._answers.get, MAX_LOOKUPS, MAX_WAITING, FAILURE_SECONDS, clock)

    async def __call__(self, host: str) -> str:
        try:
            return await self._calls(host, lambda: self._look_up(host))
        except CallFailed as exc:
            raise LookupFailed(str(exc)) from None

    async def _look_up(self, host: str) -> str:
        answer = self._answers[host] = await self._lookup(host)
        return answer

    def close(self) -> None:
        self._calls.close()
