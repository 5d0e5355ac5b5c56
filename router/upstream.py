"""The upstream hop: one pooled aiohttp client per process, and its errors mapped in one place.

aiohttp rather than httpx: under concurrent use httpx's connection pool serialises and the
proxy's throughput collapses as concurrency rises (encode/httpx#3215); `bench/` records
the comparison.
"""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp.abc import AbstractResolver
from yarl import URL

from router.errors import ConnectFailed, ProxyError, UpstreamFailed, UpstreamTimeout

# Below the 5 s idle timeout of uvicorn, node and most sandbox servers, so the router
# drops a pooled connection before the pod does and never writes into a closing one.
KEEPALIVE_SECONDS = 4.0
# Headers aiohttp would add on its own; the client's own values (or none) pass instead.
_NO_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


def create_session(resolver: AbstractResolver | None = None) -> aiohttp.ClientSession:
    """The process's one client: unlimited pooled keep-alive connections, bytes untouched
    (no decompression), no cookie jar (cookies belong to the client, not the router).
    `resolver` replaces the system's name lookups (tests map cluster DNS names to loopback)."""
    connector = aiohttp.TCPConnector(
        resolver=resolver,
        limit=0,
        keepalive_timeout=KEEPALIVE_SECONDS,
        ttl_dns_cache=10,
        enable_cleanup_closed=False,
    )
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=_NO_AUTO_HEADERS,
        trust_env=False,
        raise_for_status=False,
    )


def timeout(seconds: float, connect: float) -> aiohttp.ClientTimeout:
    """`seconds` bounds every wait for the pod (its headers, then each body read), so a
    long stream that keeps moving is never cut; `connect` bounds one connection attempt."""
    return aiohttp.ClientTimeout(total=None, sock_connect=connect, sock_read=seconds)


def url(target: str) -> URL:
    """The target URL with the path and query exactly as received (`%2F` stays encoded)."""
    return URL(target, encoded=True)


def map_error(exc: BaseException) -> ProxyError:
    """Which failures may move on to the next pod: only those where nothing was sent."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError | aiohttp.ClientConnectorError):
        return ConnectFailed()
    if isinstance(exc, asyncio.TimeoutError):  # aiohttp's socket read timeouts included
        return UpstreamTimeout()
    return UpstreamFailed()


UPSTREAM_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)
