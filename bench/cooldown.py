"""`python -m bench.cooldown`: does the busy cooldown (router/health.py) starve pods that
free up? Four capacity-1 pods (each works 0.02-0.3 s on one request, at random, and
answers 503 to any other meanwhile), one router in this process, N clients each sending
one request after another for a few seconds; for each busy cooldown tried, the client's
200s and 503s and the pods' 503s per request (attempts wasted on a busy pod). A cooldown
that starves a pod shows as fewer 200s or more client 503s than no cooldown at all.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import threading
import time
from collections.abc import Sequence

import httpx

from router import health
from router.app import Router
from router.config import Config, StaticPod
from router.server import ServerThread, bind, server_config

WORK_SECONDS = (0.02, 0.3)


class CapacityOnePods:
    """Four raw HTTP pods on 127.0.0.2-5 in one event loop thread, each working `work`
    seconds (drawn uniformly from the range) on one request; counts what they did."""

    def __init__(self, count: int = 4, work: tuple[float, float] = WORK_SECONDS) -> None:
        self.ok = self.busy = 0
        self._work = work
        self.ports: list[tuple[str, int]] = []
        self._loop = asyncio.new_event_loop()
        self._working: set[int] = set()
        self._random = random.Random(1)
        ready = threading.Event()
        threading.Thread(target=self._run, args=(count, ready), daemon=True).start()
        ready.wait(10)

    def _run(self, count: int, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        for index in range(count):
            server = self._loop.run_until_complete(asyncio.start_server(
                lambda r, w, i=index: self._serve(i, r, w), f"127.0.0.{index + 2}", 0))
            self.ports.append(server.sockets[0].getsockname()[:2])
        ready.set()
        self._loop.run_forever()

    async def _serve(self, index: int, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                if index in self._working:
                    self.busy += 1
                    writer.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
                    continue
                self._working.add(index)
                await asyncio.sleep(self._random.uniform(*self._work))
                self._working.discard(index)
                self.ok += 1
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)


def measure(clients: int, seconds: float, pods: CapacityOnePods) -> tuple[int, int, int]:
    config = Config(port=0, metrics_port=0, access_log=False, log_level="warning",
                    pods=tuple(StaticPod(f"pod-{i}", ip, port)
                               for i, (ip, port) in enumerate(pods.ports)))
    server = ServerThread(server_config(config, Router(config)), bind("127.0.0.1")).start()
    statuses: list[int] = []
    busy_before = pods.busy
    deadline = time.monotonic() + seconds

    def client() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            while time.monotonic() < deadline:
                statuses.append(http.get("/").status_code)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    server.stop()
    return statuses.count(200), statuses.count(503), pods.busy - busy_before


def print_header(*columns: str) -> None:
    """The Markdown table head: `columns` first, then the three results every row ends with."""
    columns = (*columns, "client 200s", "client 503s", "wasted attempts / request")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))


def print_row(*cells: object, ok: int, busy: int, wasted: int, requests: int) -> None:
    """One table row: `cells`, the client's 200s and 503s, and the pods' 503s per request."""
    results = (*cells, ok, busy, f"{wasted / max(requests, 1):.2f}")
    print("| " + " | ".join(str(cell) for cell in results) + " |", flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cooldown", description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", default="2,3,4", help="comma-separated client counts")
    parser.add_argument("--cooldowns", default="0,0.1,1",
                        help="first busy cooldowns to try (each doubling to 10x, 0 = none)")
    args = parser.parse_args(argv)
    pods = CapacityOnePods()
    print_header("clients", "busy cooldown s")
    try:
        for clients in (int(c) for c in args.clients.split(",")):
            for first in (float(c) for c in args.cooldowns.split(",")):
                health.COOLDOWNS["busy"] = (first, first * 10)
                ok, busy, wasted = measure(clients, args.seconds, pods)
                print_row(clients, f"{first:g}", ok=ok, busy=busy, wasted=wasted,
                          requests=ok + busy)
    finally:
        pods.stop()


if __name__ == "__main__":
    main()
