"""A raw-socket client for hostile-traffic tests: it sends exactly the bytes it is given
(and can stop reading). Its pod counterpart is tests/rawpod.py."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass


@dataclass
class Answer:
    """One HTTP answer as read off the wire."""

    status: int
    headers: dict[str, str]
    body: bytes

    def detail(self) -> str:
        return str(json.loads(self.body)["detail"])


class RawClient:
    """One TCP connection to `port` on 127.0.0.1 (from `source`, another loopback address,
    to be another client); every wait is bounded by `timeout`."""

    def __init__(self, port: int, timeout: float = 10.0, buffer: int | None = None,
                 source: str | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if buffer is not None:  # a small receive window makes "stops reading" bite early
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
        if source is not None:
            self.sock.bind((source, 0))
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        self._pending = b""

    def send(self, data: bytes) -> bool:
        """False once the router has closed the connection (the rest is not sent)."""
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True

    def send_until_refused(self, head: bytes, filler: bytes, limit: int) -> int:
        """Send `head`, then `filler` over and over until the router stops taking it or
        `limit` bytes went; returns the bytes sent."""
        sent = len(head) if self.send(head) else 0
        while sent < limit and self.send(filler):
            sent += len(filler)
        return sent

    def _recv(self) -> bytes:
        try:
            return self.sock.recv(65536)
        except ConnectionResetError:
            return b""

    def answer(self) -> Answer | None:
        """The next answer, or None if the connection ended before one began."""
        data = self._pending
        while b"\r\n\r\n" not in data:
            more = self._recv()
            if not more:
                assert not data, f"connection ended inside an answer head: {data!r}"
                return None
            data += more
        head, _, rest = data.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            more = self._recv()
            assert more, "connection ended inside an answer body"
            rest += more
        self._pending = rest[length:]
        return Answer(int(status_line.split()[1]), headers, rest[:length])

    def closed(self) -> bool:
        """Reads to the end: True if the router closed the connection (EOF or reset)
        before the timeout, with nothing more than what was read already."""
        try:
            while self._recv():
                pass
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        self.sock.close()


def request(port: int, data: bytes) -> Answer | None:
    """Send `data` on a new connection and read the one answer."""
    client = RawClient(port)
    try:
        client.send(data)
        return client.answer()
    finally:
        client.close()

