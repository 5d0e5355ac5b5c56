"""What a client can make the router hold, bounded: the per-connection timer behind
`--header-timeout` and `--body-timeout`, `--max-body-size`, the answers a refused
connection gets and how it closes, the file-descriptor reserve (the protocol in
`router.protocol` applies them), and the descriptors' share of upgraded connections
(`--upgrade-max`'s default)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import resource
from collections.abc import Callable
from http import HTTPStatus

MAX_HEADERS = 100
"""Header lines of a request (431 above) or of a pod's answer head (502 above), at most:
Envoy's `max_headers_count` and HAProxy's `tune.http.maxhdr` are as many, both ways."""


def nothing() -> None:
    """The callback of something let go: what a timer, protocol or cycle calls once its
    owner is done, so that it holds no reference to that owner."""


class Deadline:
    """One timer per connection for whichever wait is current (a head, a body), moved
    without a new timer: `start` only records a later deadline, and the timer, firing
    before it, re-arms once for it. A keep-alive connection so costs one timer event per
    timeout period, not a timer per request. 0 seconds means no deadline."""

    __slots__ = ("_loop", "_on_expiry", "_handle", "_armed", "_at")

    def __init__(self, loop: asyncio.AbstractEventLoop, on_expiry: Callable[[], None]) -> None:
        self._loop = loop
        self._on_expiry = on_expiry
        self._handle: asyncio.TimerHandle | None = None
        self._armed = 0.0  # when `_handle` fires
        self._at: float | None = None

    def start(self, seconds: float) -> None:
        if not seconds:
            self._at = None
            return
        at = self._loop.time() + seconds
        self._at = at
        if self._handle is None or self._armed > at:
            self._arm(at)

    @property
    def due(self) -> float | None:
        """When the current wait runs out (loop time), None if nothing is timed."""
        return self._at

    def stop(self) -> None:
        """No deadline until the next `start` (the timer, if armed, fires for nothing)."""
        self._at = None

    def close(self) -> None:
        """For good: the timer is cancelled and the callback (its protocol) let go."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._at = None
        self._on_expiry = nothing

    def _arm(self, at: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._armed = at
        self._handle = self._loop.call_at(at, self._fire)

    def _fire(self) -> None:
        self._handle = None
        at = self._at
        if at is None:
            return
        if at > self._loop.time():
            self._arm(at)
            return
        self._at = None
        self._on_expiry()


def refusal(status: int, detail: str) -> bytes:
    """A whole answer, written by the protocol itself to a request that never reaches the
    app (its head is malformed, too large or too slow), closing the connection."""
    reason = HTTPStatus(status).phrase.encode()
    body = json.dumps({"detail": detail}, separators=(",", ":")).encode()
    return b"".join([
        b"HTTP/1.1 %d %s\r\n" % (status, reason),
        b"content-type: application/json\r\n",
        b"content-length: %d\r\n" % len(body),
        b"connection: close\r\n\r\n",
        body,
    ])


def too_large(size: int, limit: int) -> bool:
    """Whether a request body of `size` bytes (declared, or received so far) is above
    `--max-body-size` `limit` (0: no limit)."""
    return 0 < limit < size


LINGER = 1.0
"""Seconds a connection answered under a request body still arriving goes on reading, and
dropping, what comes, its write side shut after the answer (RFC 9112 9.6's staged close),
rather than being closed at once: a close with bytes unread sends a reset, and a reset can
destroy the answer before the client reads it (a Windows client drops what it had not
read; a lost segment of the answer is never resent). Not a drain: the body is not read
to keep the connection, which closes when the client does or this runs out. nginx's
`lingering_close` (up to 30 s), Envoy's `delayed_close_timeout` (1 s)."""
LINGER_LIMIT = 1024 * 1024
"""Bytes a lingering connection drops before it closes anyway: what a client has in
flight when it sees the answer, not an endless sender's whole stream."""


def raise_fd_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard one (as Go does at start): the soft default
    (often 1,024) is far below what a proxy holding two descriptors per request needs."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):  # a hard limit the kernel refuses
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    _soft_limit.cache_clear()


@functools.cache
def _soft_limit() -> int:
    """The soft RLIMIT_NOFILE, read once (it changes only in `raise_fd_limit`), rather
    than a system call per accepted connection."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def fd_reserve(limit: int) -> int:
    """Descriptors kept free for new clients and their pod connections; as many idle
    clients are closed at once when the reserve is reached (nginx drains 32)."""
    return max(16, limit // 64)


UPGRADE_MAX_FLOOR = 16
"""The least `--upgrade-max` derived from the descriptor limit: below 64 descriptors a
quarter would leave hardly any upgrade, and a router that small serves little anyway."""
UNBOUNDED_TABLE = 1 << 20
"""The descriptor limit assumed when the soft limit is unlimited (not possible on Linux,
whose `fs.nr_open`, by default this, bounds it): a finite `--upgrade-max` still."""


def upgrade_max_default() -> int:
    """`--upgrade-max` when not given: a quarter of the soft descriptor limit (call it
    after `raise_fd_limit`), at least `UPGRADE_MAX_FLOOR`. Each tunnel (and handshake)
    holds two descriptors, the client's and the pod's, so tunnels hold at most half the
    table: the other half, less `fd_reserve`, stays for HTTP clients and their pod
    connections whatever clients upgrade, and a full table is never the tunnels' doing."""
    limit = _soft_limit()
    if limit == resource.RLIM_INFINITY:
        limit = UNBOUNDED_TABLE
    return max(UPGRADE_MAX_FLOOR, limit // 4)


def descriptors_plentiful(fileno: int) -> bool:
    """Whether a socket numbered `fileno` leaves at least half the descriptor table free
    (numbers are handed out lowest first, so N means N are open)."""
    limit = _soft_limit()
    return limit == resource.RLIM_INFINITY or fileno < limit // 2


def connections_to_drain(fileno: int) -> int:
    """How many idle clients to close now that a socket numbered `fileno` was accepted:
    0 unless the descriptor table is nearly full. The kernel hands out the lowest free
    number, so descriptor N means 0..N-1 are all open: an exact lower bound, for one
    look-up per connection. (Waiting for accept to fail does not work under uvloop:
    libuv's EMFILE trick accepts and closes the waiting clients itself, reporting
    nothing, which is the empty reply a client saw.)"""
    limit = _soft_limit()
    if limit == resource.RLIM_INFINITY:
        return 0
    reserve = fd_reserve(limit)
    return reserve if fileno >= limit - reserve else 0
