"""Name lookups for the upstream hop: a pinned sandbox the router has not indexed is reached
by its cluster DNS name, and an operator's `--pods` may name hosts.

Bounded, because a lookup is not the request's to cancel: uvloop hands it to one of
libuv's four threads (`UV_THREADPOOL_SIZE`), where the system resolver holds it until it
answers or gives up, tens of seconds against a DNS server that has stopped answering
(every search domain, both address families, retried). A request's connect timeout
abandons the wait, not the lookup. Unbounded, every request for a name nobody knows,
during a DNS outage, queued another lookup behind the ones holding the threads, and
after the outage the backlog still had to run before a new name was looked up. So:

one lookup per name at a time, answers kept `ANSWER_SECONDS` and failures 1 s (a name
that does not exist costs a lookup a second, not one per request), at most four under way
(libuv's threads), one of them for names that resolved before, a request for another name
waiting for one to end within its connect timeout (`router.shared_calls`, `BOUNDS`).

nginx's `resolver` caches answers and failures alike, and Envoy's DNS cache bounds its
hosts and pending lookups, for the same reasons."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from cachetools import TTLCache

from router.shared_calls import Bounds, CallFailed, SharedCalls

Lookup = Callable[[str], Awaitable[str]]
"""A host name to one IP address; raises OSError when there is none."""

ANSWER_SECONDS = 10.0
BOUNDS = Bounds(slots=3, renewal_slots=1, max_waiting=1024, failure_ttl=1.0,
                renew_window=10 * ANSWER_SECONDS)
"""Four lookups under way at most, libuv's threads (beyond, they would only queue there,
out of reach): three for new names, one for names that resolved within the window, so
random names cannot keep a sandbox's name from being looked up again. Failures kept 1 s;
1024 requests waiting per lane, then a 502 at once."""
CACHED_NAMES = 4096


class LookupFailed(OSError):
    """The name has no address (or the lookup failed) now or within a second; or too many
    requests wait for a lookup already."""


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
        self._calls: SharedCalls[str, str] = SharedCalls(self._answers.get, BOUNDS,
                                                         clock=clock)

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
