"""A pod that takes each request and dies with it: it accepts, reads the request head and
resets the connection, counting the connections it accepted. Plain blocking sockets in a
thread of its own, so it sees exactly what reaches it."""

from __future__ import annotations

import socket
import struct
import threading


class ResettingPod:
    def __init__(self, name: str, ip: str, port: int = 0) -> None:
        self.name = name
        self.listener = socket.create_server((ip, port))
        self.ip, self.port = self.listener.getsockname()[:2]
        self.accepted = 0
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:  # `stop` shut the listener down
                return
            self.accepted += 1
            with conn:
                conn.settimeout(10)
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    head += chunk
                # Linger 0: the close sends RST, as a crashing process's socket does.
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def stop(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept
        self.listener.close()
        self._thread.join(10)
