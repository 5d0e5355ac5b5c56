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
defaults) is uvicorn's rule, unchanged; any message but a plain first head goes to
uvicorn's own `send`.
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
    """See the module docstring. Adds behaviour only, no state: the protocol turns
    one for every request (`HttpProtocol._start_cycle`)."""

    async def send(self, message: Message) -> None:  # type: ignore[override]
        if (message["type"] != "http.response.start" or self.response_started
                or self.disconnected or self.flow.write_paused or self.access_log):
            await super().send(message)  # type: ignore[arg-type]
            return
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
