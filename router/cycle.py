"""One request's cycle on a client connection: uvicorn's `RequestResponseCycle`, with the
answer written for less. `router.protocol.HttpProtocol` makes one per request.

Three costs of uvicorn's cycle are gone, each counted with callgrind (#13):

- The head waits for the first body message and goes out with it, in one write: what the
  ASGI specification asks of a server ("must not start sending the response to the
  client until it has received at least one Response Body event"). uvicorn writes the head
  at once, so a proxied answer took two writes, or one with a coalescing transport that
  flushed in a later turn of the loop, when 255 other requests had pushed this one's
  objects out of the CPU's cache. An app that streams sends an empty body message right
  after the head to have it go out without waiting for content (`router.proxy`).
- uvicorn checks each header of an answer with two regular-expression searches, each
  paying `re`'s set-up (on a small proxied answer 6% of the router's instructions). Here
  the same two expressions, uvicorn's own, run once over all the names and once over all
  the values: a forbidden byte in any header is a forbidden byte in their concatenation,
  so the same heads are refused, with the same error type.
- uvicorn's task drops itself from the server's task set through a done callback: one
  more pass of the loop per request. `run_asgi` (uvicorn's, with that) does it as the
  task ends.

Everything else (lower-cased names, the framing read from `Content-Length`,
`Transfer-Encoding` and `Connection`, the `connection: close` and chunked defaults, HEAD
answers, the errors for a body longer or shorter than declared) is uvicorn's rule,
unchanged; tests/test_cycle.py holds the two to the same bytes. Only how an answer that
does not keep its connection closes it is the protocol's (`closing`: it may linger).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

from uvicorn._types import ASGI3Application
from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    RequestResponseCycle,
)

from router.asgi import Message
from router.limits import nothing


def _matching(pattern: re.Pattern[bytes]) -> bytes:
    """Every byte a one-character expression matches."""
    return bytes(byte for byte in range(256) if pattern.fullmatch(bytes((byte,))))


# The bytes uvicorn's two expressions refuse, taken from them, so the rule stays theirs.
_BAD_IN_NAME = _matching(HEADER_RE)
_BAD_IN_VALUE = _matching(HEADER_VALUE_RE)


def _has_any(data: bytes, bad: bytes) -> bool:
    """Whether `data` holds one of the bytes in `bad`: one pass in C (a search with the
    expression itself cost about fifty instructions a byte)."""
    return len(data.translate(None, bad)) != len(data)


WHOLE_LIMIT = 16 * 1024
"""A body up to this size is copied behind its held head (one buffer, one write); a larger
one is written beside it uncopied (`writelines`)."""


class MessageEvent:
    """uvicorn's per-request `asyncio.Event` (the request's `receive` waits on it for body
    and disconnection), in two slots: an Event is an object, a dictionary and a 632-byte
    deque of waiters, allocated for every request and touched again when it ends (#13).
    Made for one waiter at a time, the request's `receive` (an ASGI app does not call it
    twice at once): waiters at the same time share one future, so cancelling one would
    cancel them all. A wait given up (cancelled) leaves the next one a new future."""

    __slots__ = ("_set", "_waiter")

    def __init__(self) -> None:
        self._set = False
        self._waiter: asyncio.Future[None] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        if not self._set:
            self._set = True
            waiter, self._waiter = self._waiter, None
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> bool:
        if not self._set:
            waiter = self._waiter
            if waiter is None or waiter.done():
                waiter = self._waiter = asyncio.get_running_loop().create_future()
            await waiter
        return True


class ProxyCycle(RequestResponseCycle):
    """See the module docstring. The protocol makes one for every request
    (`HttpProtocol._start_cycle`) and gives it `tasks`, its server's running requests,
    `task`, the one that runs it, and `closing`, before that starts."""

    _held: list[bytes] | None = None
    """The answer's head, in pieces, until the first body message."""
    tasks: set[asyncio.Task[None]]
    task: asyncio.Task[None] | None
    closing: Callable[[], None] | None = None
    """Ends the connection after an answer that does not keep it: the protocol's `linger`
    (which may read on a moment, so that a reset does not destroy the answer); None, as
    uvicorn does, at once."""

    async def run_asgi(self, app: ASGI3Application) -> None:
        """uvicorn 0.54's, step for step, and the task then leaves `tasks` (see the module
        docstring; uvicorn is pinned below 0.55)."""
        try:
            result = await app(self.scope, self.receive,  # type: ignore[func-returns-value]
                               self.send)  # type: ignore[arg-type]
        except BaseException as exc:
            self.logger.error("Exception in ASGI application\n", exc_info=exc)
            if not self.response_started:
                await self.send_500_response()
            else:
                self.transport.close()
        else:
            if result is not None:
                self.logger.error("ASGI callable should return None, but returned '%s'.",
                                  result)
                self.transport.close()
            elif not self.response_started and not self.disconnected:
                self.logger.error("ASGI callable returned without starting response.")
                await self.send_500_response()
            elif not self.response_complete and not self.disconnected:
                self.logger.error("ASGI callable returned without completing response.")
                self.transport.close()
        finally:
            self.on_response, self.closing = nothing, None
            task, self.task = self.task, None
            self.tasks.discard(task)

    async def send(self, message: Message) -> None:  # type: ignore[override]
        kind = message["type"]
        if self.disconnected or self.flow.write_paused:
            pass  # uvicorn's: it waits for the client to read, or drops the message
        elif kind == "http.response.start" and not self.response_started:
            if not self.access_log:
                self._head(message)
                return
        elif kind == "http.response.body" and self.response_started and not self.response_complete:
            self._body(message)
            return
        held = self._held
        if held is not None and not self.disconnected:
            self._held = None
            self.transport.write(b"".join(held))
        await super().send(message)  # type: ignore[arg-type]

    def _body(self, message: Message) -> None:
        """uvicorn's body message, written behind the held head, if there is one."""
        body: bytes = message.get("body", b"")
        more: bool = message.get("more_body", False)
        if self.scope["method"] == "HEAD":
            self.expected_content_length = 0
            body = b""
        elif self.chunked_encoding:
            body = b"%x\r\n%b\r\n" % (len(body), body) if body else b""
            if not more:
                body += b"0\r\n\r\n"
        else:
            if len(body) > self.expected_content_length:
                raise RuntimeError("Response content longer than Content-Length")
            self.expected_content_length -= len(body)
        held = self._held
        if held is None:
            self.transport.write(body)
        else:
            self._held = None
            if len(body) > WHOLE_LIMIT:
                self.transport.writelines((b"".join(held), body))
            else:
                held.append(body)
                self.transport.write(b"".join(held))
        if not more:
            if self.expected_content_length != 0:
                raise RuntimeError("Response content shorter than Content-Length")
            self.response_complete = True
            self.message_event.set()
            if not self.keep_alive:
                (self.closing or self.transport.close)()
            self.on_response()

    def _head(self, message: Message) -> None:
        self.response_started = True
        self.waiting_for_100_continue = False
        status = message["status"]
        content = [STATUS_LINE[status]]
        close = False
        for name, value in [*self.default_headers, *message.get("headers", ())]:
            name = name.lower()
            if name == b"content-length" and self.chunked_encoding is None:
                self.expected_content_length = int(value.decode())
                self.chunked_encoding = False
            elif name == b"transfer-encoding" and value.lower() == b"chunked":
                self.expected_content_length = 0
                self.chunked_encoding = True
            elif name == b"connection" and b"close" in [
                    token.lower().strip() for token in value.split(b",")]:
                self.keep_alive = False
                close = True
            content.extend((name, b": ", value, b"\r\n"))
        # The names are content[1], [5], [9] ..., the values content[3], [7], [11] ...
        if _has_any(b"".join(content[1::4]), _BAD_IN_NAME):
            raise RuntimeError("Invalid HTTP header name.")
        if _has_any(b"".join(content[3::4]), _BAD_IN_VALUE):
            raise RuntimeError("Invalid HTTP header value.")
        if not self.keep_alive and not close:
            content.append(b"connection: close\r\n")
        if (self.chunked_encoding is None and self.scope["method"] != "HEAD"
                and status not in (204, 304)):
            self.chunked_encoding = True
            content.append(b"transfer-encoding: chunked\r\n")
        content.append(b"\r\n")
        self._held = content
