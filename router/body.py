"""The client's request body: kept whole when small enough to replay, else streamed once.

A body up to `--retry-body-limit` with a declared length is read before the first attempt
so a busy pod can be retried with the identical bytes. A larger or chunked body streams
straight to the first pod that accepts the connection; it cannot be replayed, so once it
has started flowing the pod's answer is final. A chunked body is never replayable, even
when it all arrived in the first read, so what happens to it does not depend on the
timing of its reads (`router/replay.py`); it is forwarded chunked, as it came.

The bodies kept whole are bounded all together too (`Budget`, `--retry-body-budget`):
one body each, a client needs no pod to make the router hold a megabyte (a POST sent all
but its last bytes, then a byte before each `--body-timeout`), and 455 of them held
512 MiB (`python -m bench.held`). Past the budget a body streams as a larger one does.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

from router.asgi import Message, Receive


class ClientGone(Exception):
    """The client disconnected before its request body arrived."""


class Budget:
    """The bytes the process may hold in bodies kept whole for a retry, all requests
    together (`size` 0: no bound). One event loop takes and gives: no lock."""

    __slots__ = ("_left",)

    def __init__(self, size: int) -> None:
        self._left: float = size or math.inf

    def take(self, size: int) -> bool:
        """Whether `size` more bytes may be kept; if so they are counted until `give`."""
        if size > self._left:
            return False
        self._left -= size
        return True

    def give(self, size: int) -> None:
        self._left += size

    @property
    def left(self) -> float:
        return self._left


class RequestBody:
    __slots__ = ("_receive", "_whole", "_declared", "_first", "size", "complete", "_budget",
                 "_kept")

    def __init__(
        self, receive: Receive, whole: bytes | None, first: bytes = b"", more: bool = False,
        declared: int | None = None,
    ) -> None:
        self._receive = receive
        self._whole = whole
        self._declared = declared
        self._first = first
        self.size = len(whole) if whole is not None else 0
        # True once the client has sent its last byte; until then only the stream may
        # call `receive`.
        self.complete = not more
        self._budget: Budget | None = None  # what `_kept` was taken from, if anything
        self._kept = 0

    @property
    def replayable(self) -> bool:
        return self._whole is not None

    @classmethod
    async def read(cls, receive: Receive, content_length: int | None, limit: int,
                   budget: Budget) -> RequestBody:
        """The body, kept whole (replayable) when its length is declared, within `limit`,
        and `budget` has room for it as it arrives; else streamed (what came first, then
        the rest). A kept body holds its share of `budget` until `release`."""
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk: bytes = message.get("body", b"")
        more = message.get("more_body", False)
        if content_length is None:  # no body, or a chunked one: streamed, never replayed
            return cls(receive, None, chunk, more) if chunk or more else cls(receive, b"")
        if (content_length if more else len(chunk)) > limit or not budget.take(len(chunk)):
            return cls(receive, None, chunk, more, declared=content_length)
        # Taken as the bytes arrive, not as declared: a head declaring a megabyte, then a
        # byte before each --body-timeout, would hold a megabyte of the budget, not of memory.
        kept = len(chunk)
        try:
            parts = [chunk]
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientGone
                piece: bytes = message.get("body", b"")
                more = message.get("more_body", False)
                parts.append(piece)
                if not budget.take(len(piece)):  # no room left: what came streams first
                    streamed = cls(receive, None, b"".join(parts), more,
                                   declared=content_length)
                    budget.give(kept)
                    return streamed
                kept += len(piece)
        except BaseException:  # the client left, or the request was cancelled
            budget.give(kept)
            raise
        body = cls(receive, chunk if len(parts) == 1 else b"".join(parts),
                   declared=content_length)
        body._budget, body._kept = budget, kept
        return body

    def release(self) -> None:
        """The request is over: what the body held of the budget goes back."""
        if self._budget is not None:
            self._budget.give(self._kept)
            self._budget = None

    def data(self) -> bytes | AsyncIterator[bytes] | None:
        """What the upstream client sends: None for no body (a GET gains no length), but
        an empty body the client declared (`Content-Length: 0`) stays declared."""
        if self._whole is not None:
            return self._whole if self._whole or self._declared is not None else None
        return self._stream()

    async def _stream(self) -> AsyncIterator[bytes]:
        self.size = len(self._first)
        yield self._first
        self._first = b""  # not held once sent: the pod may take its time to answer
        while not self.complete:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk, more = message.get("body", b""), message.get("more_body", False)
            del message
            self.size += len(chunk)
            if chunk:
                yield chunk
            del chunk  # neither is held while the next piece is awaited (it may be minutes)
            self.complete = not more


async def _nothing_received() -> Message:
    raise AssertionError("a request without a body has nothing to receive")


NO_BODY = RequestBody(_nothing_received, b"")
"""A request without a body, for every such request: nothing to wait for (`read` would
ask `receive` for the empty message the server has ready), and nothing of it changes."""
