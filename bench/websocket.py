"""`python -m bench.websocket`: a WebSocket echo through the router, through nginx (its
documented WebSocket proxying: `proxy_http_version 1.1` and the upgrade headers) and
direct, in one run. Prints a Markdown table and the goals: round trips per second at 1
and 64 connections with 16-byte messages (latency: what a terminal or an IDE feels), and
MiB/s echoed at 4 connections with 1 MiB messages (bulk: a file pushed over a socket).

Every process is a child stopped by its PID: the echo pod (aiohttp's WebSocket server,
on 127.0.0.2), nginx, the router (`--no-access-log --metrics-port 0`, as in bench/run.py)
and, per cell, the load generator (aiohttp's client, in a process of its own so it does
not share a core's GIL with the pod). Cells are interleaved, target by target, so drift of
the shared machine hits all three alike; quote the ratios of one run.

`python -m bench.websocket pod HOST PORT` and `... load URL CONNECTIONS SIZE SECONDS` are
those children's entry points.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
from aiohttp import ClientSession, TCPConnector, WSMsgType, web

from bench import nginx
from bench.nginx import Pod
from bench.procs import Child, free_port
from bench.router import RouterProcess

SMALL = 16
LARGE = 1024 * 1024
MiB = 1024 * 1024


@dataclass(frozen=True)
class Cell:
    name: str
    connections: int
    size: int
    unit: str  # "rt/s" or "MiB/s"
    goal: float  # the router's least share of nginx's figure


CELLS = (
    Cell("16 B round trips, 1 connection", 1, SMALL, "rt/s", 0.5),
    Cell("16 B round trips, 64 connections", 64, SMALL, "rt/s", 0.5),
    Cell("1 MiB messages, 4 connections", 4, LARGE, "MiB/s", 0.9),
)


# The pod: echoes every message.

async def _echo(request: web.Request) -> web.StreamResponse:
    ws = web.WebSocketResponse(max_msg_size=0)
    if not ws.can_prepare(request).ok:
        return web.Response(text="echo pod")
    await ws.prepare(request)
    async for message in ws:
        if message.type == WSMsgType.BINARY:
            await ws.send_bytes(message.data)
        elif message.type == WSMsgType.TEXT:
            await ws.send_str(message.data)
    return ws


def serve_pod(host: str, port: int) -> None:
    app = web.Application()
    app.router.add_get("/{tail:.*}", _echo)
    web.run_app(app, host=host, port=port, access_log=None, print=None)


# The load generator: each connection sends a message and waits for its echo, in a loop.

async def _connection(session: ClientSession, url: str, size: int, stop: float,
                      counted_from: float, counts: list[int]) -> None:
    payload = b"m" * size
    async with session.ws_connect(url, max_msg_size=0, autoping=False) as ws:
        loop = asyncio.get_running_loop()
        while (now := loop.time()) < stop:
            await ws.send_bytes(payload)
            message = await ws.receive()
            if message.type != WSMsgType.BINARY or len(message.data) != size:
                raise RuntimeError(f"bad echo: {message.type}")
            if now >= counted_from:
                counts[0] += 1


async def _load(url: str, connections: int, size: int, seconds: float, warmup: float
                ) -> dict[str, float]:
    counts = [0]
    loop = asyncio.get_running_loop()
    start = loop.time()
    async with ClientSession(connector=TCPConnector(limit=0)) as session:
        await asyncio.gather(*(
            _connection(session, url, size, start + warmup + seconds, start + warmup, counts)
            for _ in range(connections)
        ))
    return {"round_trips": counts[0], "seconds": seconds, "size": size}


def run_load(url: str, connections: int, size: int, seconds: float) -> float:
    """Round trips/s, or MiB/s echoed, measured by a load generator process of its own."""
    output = subprocess.run(
        [sys.executable, "-m", "bench.websocket", "load", url, str(connections), str(size),
         str(seconds)],
        capture_output=True, text=True, timeout=seconds + 60, check=True,
    ).stdout
    result = json.loads(output)
    rate = result["round_trips"] / result["seconds"]
    return rate * size / MiB if size >= MiB else rate


# The run.

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.websocket", description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0, help="per cell and target")
    parser.add_argument("--reps", type=int, default=2, help="rounds; the best is kept")
    args = parser.parse_args(argv)
    pod = Pod("pod-0", "127.0.0.2", free_port(("127.0.0.2",)))
    with tempfile.TemporaryDirectory(prefix="bench-ws-") as temp:
        workdir = Path(temp)
        children: list[Child] = []
        try:
            echo = Child("pod", [sys.executable, "-m", "bench.websocket", "pod", pod.host,
                                 str(pod.port)], workdir / "pod.log")
            children.append(echo)
            echo.wait_ready(pod.url + "/")
            proxy_port = free_port()
            children.append(nginx.start_websocket_proxy("nginx", workdir, pod, proxy_port))
            router = RouterProcess("router", workdir, [pod], observability=False)
            children.append(router)
            targets = {"direct": (pod.url, None),
                       "nginx": (f"http://127.0.0.1:{proxy_port}", children[1].pid),
                       "router": (router.url, router.pid)}
            results = measure(targets, args.seconds, args.reps)
        finally:
            for child in children:
                child.stop()
    print(table(results))


def measure(targets: dict[str, tuple[str, int | None]], seconds: float, reps: int
            ) -> dict[str, dict[str, float]]:
    """Per cell and target, the best rate of `reps` rounds, and for the proxies the
    share of one core they used in that round (CPU-seconds ÷ wall seconds, warm-up
    included): at the same rate, the one using less CPU has room left."""
    results: dict[str, dict[str, float]] = {cell.name: {} for cell in CELLS}
    for _ in range(reps):
        for cell in CELLS:
            for name, (url, pid) in targets.items():
                process = psutil.Process(pid) if pid is not None else None
                cpu_before, wall_before = _cpu(process), time.monotonic()
                rate = run_load(url.replace("http://", "ws://") + "/ws", cell.connections,
                                cell.size, seconds)
                row = results[cell.name]
                if rate > row.get(name, 0.0):
                    row[name] = rate
                    row[f"{name} cpu"] = ((_cpu(process) - cpu_before)
                                          / (time.monotonic() - wall_before))
    return results


def _cpu(process: psutil.Process | None) -> float:
    if process is None:
        return 0.0
    times = process.cpu_times()
    return float(times.user + times.system)


def table(results: dict[str, dict[str, float]]) -> str:
    lines = ["| cell | direct | nginx | router | router ÷ nginx | router ÷ direct | goal "
             "| CPU: nginx, router |",
             "|---|---|---|---|---|---|---|---|"]
    for cell in CELLS:
        row = results[cell.name]
        share = row["router"] / row["nginx"]
        verdict = "met" if share >= cell.goal else "MISSED"
        lines.append(
            f"| {cell.name} ({cell.unit}) | {row['direct']:,.0f} | {row['nginx']:,.0f} | "
            f"{row['router']:,.0f} | {share:.2f} | {row['router'] / row['direct']:.2f} | "
            f"≥ {cell.goal} of nginx: {verdict} | "
            f"{row['nginx cpu']:.0%}, {row['router cpu']:.0%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["pod"]:
        serve_pod(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1:2] == ["load"]:
        url, connections, size, seconds = sys.argv[2:6]
        print(json.dumps(asyncio.run(_load(url, int(connections), int(size), float(seconds),
                                           warmup=1.0))))
    else:
        started = time.monotonic()
        main()
        print(f"\n({time.monotonic() - started:.0f} s)")
