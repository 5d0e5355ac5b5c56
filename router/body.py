"""The client's request body: kept whole when small enough to replay, else streamed once.

A body up to `--retry-body-limit` with a declared length is read before the first attempt
so a busy pod can be retried with the identical bytes. A larger or chunked body streams
straight to the first pod that accepts the connection; it cannot be replayed, so once it
has started flowing the pod's answer is final. A chunked body is never replayable, even
when it all arrived in the first read, so what happens to it does not depend on the
timing of its reads (`router/replay.py`); it is forwarded chunked, as it came.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from router.asgi import Message, Receive


class ClientGone(Exception):
    """The client disconnected before its request body arrived."""


class RequestBody:
    __slots__ = ("_receive", "_whole", "_declared", "_first", "size", "complete")

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

    @property
    def replayable(self) -> bool:
        return self._whole is not None

    @classmethod
    async def read(cls, receive: Receive, content_length: int | None, limit: int) -> RequestBody:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk: bytes = message.get("body", b"")
        more = message.get("more_body", False)
        if content_length is None:  # no body, or a chunked one: streamed, never replayed
            return cls(receive, None, chunk, more) if chunk or more else cls(receive, b"")
        if not more and len(chunk) <= limit:
            return cls(receive, chunk, declared=content_length)
        if not more or content_length > limit:
            return cls(receive, None, chunk, more, declared=content_length)
        parts = [chunk]
        while message.get("more_body", False):
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            parts.append(message.get("body", b""))
        return cls(receive, b"".join(parts), declared=content_length)

    def data(self) -> bytes | AsyncIterator[bytes] | None:
        """What the upstream client sends: None for no body (a GET gains no length), but
        an empty body the client declared (`Content-Length: 0`) stays declared."""
        if self._whole is not None:
            return self._whole if self._whole or self._declared is not None else None
        return self._stream()

    async def _stream(self) -> AsyncIterator[bytes]:
        self.size = len(self._first)
        yield self._first
        while not self.complete:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            self.size += len(chunk)
            if chunk:
                yield chunk
            self.complete = not message.get("more_body", False)


async def _nothing_received() -> Message:
    raise AssertionError("a request without a body has nothing to receive")


NO_BODY = RequestBody(_nothing_received, b"")
"""A request without a body, for every such request: nothing to wait for (`read` would
ask `receive` for the empty message the server has ready), and nothing of it changes."""
