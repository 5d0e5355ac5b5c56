"""Raw-socket peers for hostile-traffic tests: a client that sends exactly the bytes it is
given (and can stop reading), and a pod that records every byte a connection brought."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from dataclasses import dataclass, field


@dataclass
class Answer:
    """One HTTP answer as read off the wire."""

    status: int
    headers: dict[str, str]
    body: bytes

    def detail(self) -> str:
        return str(json.loads(self.body)["detail"])


class RawClient:
    """One TCP connection to `port` on 127.0.0.1; every wait is bounded by `timeout`."""

    def __init__(self, port: int, timeout: float = 10.0, buffer: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if buffer is not None:  # a small receive window makes "stops reading" bite early
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
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


def _complete(data: bytearray) -> bool:
    """A whole request with a `Content-Length` body (or none) is in `data`."""
    head, found, body = bytes(data).partition(b"\r\n\r\n")
    if not found:
        return False
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return len(body) >= length


_CHUNK = b"10000\r\n" + b"x" * 0x10000 + b"\r\n"
"""One 64 KiB chunk of an endless answer, sent as a continuous repetition."""


@dataclass
class RawPod:
    """A pod that accepts connections on `ip` and records each one's bytes until it
    ends. `answer`: "none" answers nothing; "stream" sends an endless chunked answer as
    soon as a request head came; "ok" reads nothing for `stall` seconds, then answers
    `200 ok` once the request's declared body is in. `ended` is set when a connection it
    served was closed."""

    ip: str
    answer: str = "none"
    stall: float = 0.0
    name: str = "raw-0"
    received: list[bytearray] = field(default_factory=list)
    ended: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind((self.ip, 0))
        self.listener.listen(16)
        self.port: int = self.listener.getsockname()[1]
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):  # the listener closed by `stop`
            while True:
                conn, _ = self.listener.accept()
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        data = bytearray()
        self.received.append(data)
        conn.settimeout(0.05)
        offset: int | None = None  # where in `_CHUNK` the endless answer is, once sent
        answered = False
        self._stop.wait(self.stall)
        with conn:
            while not self._stop.is_set():
                try:
                    if offset is not None:
                        offset = (offset + conn.send(_CHUNK[offset:])) % len(_CHUNK)
                    more = conn.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if not more:
                    break
                data += more
                if self.answer == "stream" and offset is None and b"\r\n\r\n" in data:
                    conn.sendall(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                    offset = 0
                elif self.answer == "ok" and not answered and _complete(data):
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    answered = True
        if not self._stop.is_set():
            self.ended.set()

    def stop(self) -> None:
        self._stop.set()
        self.listener.close()
