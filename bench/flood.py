"""Overload that wrk does not make, run as a process of its own so it never competes with
the probe client for an event loop: `python -m bench.flood burst|uploads HOST PORT SECONDS`.

- `burst`: 2,000 new connections at once, each one `GET /` and close, again and again:
  the accept queue fills faster than one event loop empties it.
- `uploads`: 200 clients, each sending a 1 MiB `POST /upload` in 64 KiB pieces over
  about 2 s, again and again: many slow bodies held open through the router.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Sequence

BURST = 2000
UPLOADS = 200
UPLOAD_SIZE = 1024 * 1024
PIECE = 64 * 1024
PIECE_GAP = 0.125  # 16 pieces: about 2 s per upload


async def _exchange(host: str, port: int, head: bytes, body_pieces: int = 0) -> None:
    """One request on a new connection, its answer read to the end; errors are part of
    overload, not of this client."""
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        return
    try:
        writer.write(head)
        piece = b"x" * PIECE
        for _ in range(body_pieces):
            await asyncio.sleep(PIECE_GAP)
            writer.write(piece)
            await writer.drain()
        await reader.read()  # `Connection: close`: the answer ends with the connection
    except OSError:
        pass
    finally:
        writer.close()


async def burst(host: str, port: int, seconds: float) -> None:
    head = f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await asyncio.gather(*(_exchange(host, port, head) for _ in range(BURST)))


async def uploads(host: str, port: int, seconds: float) -> None:
    head = (f"POST /upload HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
            f"Content-Length: {UPLOAD_SIZE}\r\n\r\n").encode()
    deadline = time.monotonic() + seconds

    async def client() -> None:
        while time.monotonic() < deadline:
            await _exchange(host, port, head, UPLOAD_SIZE // PIECE)

    await asyncio.gather(*(client() for _ in range(UPLOADS)))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.flood", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=("burst", "uploads"))
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("seconds", type=float)
    args = parser.parse_args(argv)
    run = burst if args.kind == "burst" else uploads
    asyncio.run(run(args.host, args.port, args.seconds))


if __name__ == "__main__":
    main()
