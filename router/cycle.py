"""One request's cycle on a client connection: uvicorn's `RequestResponseCycle`, with the
response head written for less. `router.protocol.HttpProtocol` makes one per request.

uvicorn checks each header of an answer with two regular-expression searches before it
writes the head. Every search pays `re`'s set-up, whatever the header: on a small proxied
answer with seven headers those fourteen calls were 6% of the router's instructions per
request (#13, counted with callgrind). Here the same two expressions, uvicorn's own, run
once over all the names and once over all the values: a forbidden byte in any header is
a forbidden byte in their concatenation, so the same heads are refused, with the same
error type. Everything else of the head (lower-cased names, the framing read from
`Content-Length`, `Transfer-Encoding` and `Connection`, the `connection: close` and chunked
defaults) is uvicorn's rule, unchanged. So is a body of declared length, written here
only to spare a second coroutine per message; any other message (a chunked or HEAD body,
one that must wait for the client, one out of order) goes to uvicorn's own `send`.
"""

from __future__ import annotations

import re

from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    RequestResponseCycle,
)

from router.asgi import Message


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


class ProxyCycle(RequestResponseCycle):
    """See the module docstring. Adds behaviour only, no state: the protocol makes one
    for every request (`HttpProtocol._start_cycle`)."""

    async def send(self, message: Message) -> None:  # type: ignore[override]
        kind = message["type"]
        if self.disconnected or self.flow.write_paused:
            pass  # uvicorn's: it waits for the client to read, or drops the message
        elif kind == "http.response.start" and not self.response_started:
            if not self.access_log:
                self._head(message)
                return
        elif (kind == "http.response.body" and self.response_started
              and not self.response_complete and self.chunked_encoding is False
              and self.scope["method"] != "HEAD"):
            self._body(message)
            return
        await super().send(message)  # type: ignore[arg-type]

    def _body(self, message: Message) -> None:
        """uvicorn's body of declared length, without a second coroutine per message."""
        body: bytes = message.get("body", b"")
        if len(body) > self.expected_content_length:
            raise RuntimeError("Response content longer than Content-Length")
        self.expected_content_length -= len(body)
        self.transport.write(body)
        if not message.get("more_body", False):
            if self.expected_content_length != 0:
                raise RuntimeError("Response content shorter than Content-Length")
            self.response_complete = True
            self.message_event.set()
            if not self.keep_alive:
                self.transport.close()
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
        self.transport.write(b"".join(content))
