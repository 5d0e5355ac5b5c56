"""A raw pod for hostile and fault tests: a plain TCP server on its own loopback IP, in
threads of its own (so it acts while the router's event loop is held), whose behaviour is
a function of each accepted connection sending exact bytes. It records every request it
read, so a test can prove which pod received what.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

from router.server import bind

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
BUSY = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nbusy"
LINGER_0 = struct.pack("ii", 1, 0)
WAIT = 10.0
"""Bound on every blocking read of a raw pod: a test that goes wrong fails, never hangs."""


@dataclass(frozen=True)
class Request:
    """One request a raw pod read whole: its head (request line and headers), its body
    (de-chunked) and the number of the connection it came on (1 for the first)."""

    head: bytes
    body: bytes
    connection: int

    @property
    def method(self) -> bytes:
        return self.head.split(b" ", 1)[0]

    def header(self, name: bytes) -> bytes | None:
        for line in self.head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == name:
                return value.strip()
        return None


class PodConnection:
    """The pod's end of one connection, for a behaviour to script."""

    def __init__(self, pod: RawPod, sock: socket.socket, number: int) -> None:
        self.pod = pod
        self.sock = sock
        self.number = number
        self.raw = bytearray()  # every byte read from the router, as it came
        self._buffer = b""
        sock.settimeout(WAIT)

    def read_head(self) -> bytes | None:
        """The next request head alone (not recorded as a request); None if the router
        closed first."""
        return self._until(b"\r\n\r\n")

    def read_request(self) -> Request | None:
        """The next request, recorded by the pod; None if the router closed first."""
        head = self.read_head()
        if head is None:
            return None
        request = Request(head, self._body(head), self.number)
        with self.pod.lock:
            self.pod.requests.append(request)
        self.pod.received.set()
        return request

    def _body(self, head: bytes) -> bytes:
        probe = Request(head, b"", 0)
        length = probe.header(b"content-length")
        if length is not None:
            return self._exactly(int(length))
        if probe.header(b"transfer-encoding") != b"chunked":
            return b""
        parts = []
        while size := int(self._until(b"\r\n") or b"0", 16):
            parts.append(self._exactly(size + 2)[:-2])
        self._until(b"\r\n")
        return b"".join(parts)

    def _until(self, end: bytes) -> bytes | None:
        while end not in self._buffer:
            data = self._recv()
            if not data:
                return None
            self._buffer += data
        found, _, self._buffer = self._buffer.partition(end)
        return found + end

    def _exactly(self, size: int) -> bytes:
        while len(self._buffer) < size:
            data = self._recv()
            if not data:
                break
            self._buffer += data
        found, self._buffer = self._buffer[:size], self._buffer[size:]
        return found

    def _recv(self) -> bytes:
        try:
            data = self.sock.recv(65536)
        except OSError:  # reset, or the router's close raced with ours
            return b""
        self.raw += data
        return data

    def send(self, data: bytes) -> bool:
        """False once the router has closed its end (a reset or a broken pipe)."""
        try:
            self.sock.sendall(data)
        except OSError:
            return False
        return True

    def closed_by_router(self) -> bool:
        """Waits (bounded) for the router to close its end; True if it did."""
        try:
            while data := self.sock.recv(65536):
                self.raw += data
        except TimeoutError:
            return False
        except OSError:
            pass
        return True

    def reset(self) -> None:
        """Close with a TCP reset (SO_LINGER 0), as a crashed process's socket ends."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_0)
        self.sock.close()


Behaviour = Callable[[PodConnection], None]


def answering(*answers: bytes) -> Behaviour:
    """Each connection reads requests and answers them with `answers` in turn (the
    last repeated), until the router closes it."""

    def behaviour(connection: PodConnection) -> None:
        index = 0
        while connection.read_request() is not None:
            connection.send(answers[min(index, len(answers) - 1)])
            index += 1

    return behaviour


def silent(connection: PodConnection) -> None:
    """Answers nothing: records what comes until the router closes the connection
    (`RawPod.ended`)."""
    if connection.closed_by_router():
        connection.pod.ended.set()


CHUNK = b"10000\r\n" + b"x" * 0x10000 + b"\r\n"
"""One 64 KiB chunk of an endless answer, sent as a continuous repetition."""


def streaming(connection: PodConnection) -> None:
    """Once a request head came: an endless chunked answer, until the router closes the
    connection (`RawPod.ended`), however slowly it reads."""
    if connection.read_head() is None:
        return
    sock = connection.sock
    sock.sendall(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
    sock.settimeout(0.05)  # each turn: as much as the router takes, then a look for its end
    offset = 0
    while True:
        try:
            offset = (offset + sock.send(CHUNK[offset:])) % len(CHUNK)
        except TimeoutError:
            pass
        except OSError:  # reset or broken pipe: the router closed
            break
        try:
            if not sock.recv(65536):
                break
        except TimeoutError:
            continue
        except OSError:
            break
    connection.pod.ended.set()


def answering_late(stall: float) -> Behaviour:
    """Reads nothing for `stall` seconds, then the request, body and all; answers OK."""

    def behaviour(connection: PodConnection) -> None:
        threading.Event().wait(stall)
        if connection.read_request() is not None:
            connection.send(OK)

    return behaviour


def resetting(connection: PodConnection) -> None:
    """The pod dies with each request: it reads it, then resets the connection."""
    if connection.read_request() is not None:
        connection.reset()


class RawPod:
    """A listening raw pod on `ip`; `behaviour` runs for each connection in its own thread.
    `name`, `ip` and `port` make it a static pool entry (`static_config`)."""

    def __init__(self, name: str, ip: str, behaviour: Behaviour, port: int = 0) -> None:
        self.name = name
        self.ip = ip
        self.behaviour = behaviour
        self.lock = threading.Lock()
        self.requests: list[Request] = []
        self.received = threading.Event()
        self.ended = threading.Event()  # `silent` or `streaming`: the router closed
        self._listener = bind(ip, port)
        self.port: int = self._listener.getsockname()[1]
        self._open: list[socket.socket] = []
        self._connections: list[PodConnection] = []
        self._threads: list[threading.Thread] = []
        self._accepted = 0
        self._accepting = threading.Thread(target=self._accept, daemon=True, name=name)
        self._accepting.start()

    @property
    def connections(self) -> int:
        return self._accepted

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:  # the listener was closed: `die` or `stop`
                return
            with self.lock:
                self._accepted += 1
                self._open.append(sock)
                connection = PodConnection(self, sock, self._accepted)
                self._connections.append(connection)
            thread = threading.Thread(target=self._serve, args=(connection,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, connection: PodConnection) -> None:
        try:
            self.behaviour(connection)
        finally:
            connection.sock.close()

    def die(self) -> None:
        """The pod process is gone: the listener closes (connects are refused) and every
        open connection is reset."""
        self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self.lock:
            for sock in self._open:
                try:  # the reset goes out when the connection's thread closes it
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_0)
                    sock.shutdown(socket.SHUT_RD)  # wakes that thread from its read
                except OSError:
                    pass  # closed already

    def stop(self) -> None:
        if self._listener.fileno() != -1:
            self.die()
        self._accepting.join(WAIT)
        for thread in self._threads:
            thread.join(WAIT)

    def raw_received(self) -> list[bytes]:
        """Every byte each connection brought, in the order they were accepted."""
        with self.lock:
            return [bytes(connection.raw) for connection in self._connections]

    def received_ids(self) -> list[bytes | None]:
        with self.lock:
            return [request.header(b"x-request-id") for request in self.requests]
