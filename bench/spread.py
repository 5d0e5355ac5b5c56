"""`python -m bench.spread`: do many routers over one pool stay spread out, or do they walk
the pool in lockstep and collide on busy pods? Four capacity-1 pods (each works 0.1 s on one
request and answers 503 to any other meanwhile, `bench/cooldown.py`), in front of them the
real command, `python -m router --pods ...`, as three router processes with clients spread
over them, then as one router with `--workers 3` and the clients spread over its workers;
2, 3 and 4 clients (50%, 75% and 100% of the pool's capacity), each sending one request
after another on a keep-alive connection. For each: the clients' 200s and 503s, and the
attempts wasted on busy pods per request (the pods' own 503 count).

`--router-src DIR` runs the routers from another checkout (its `router` package), for the
figures before a change.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from contextlib import ExitStack
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import psutil

from bench.cooldown import CapacityOnePods, print_header, print_row
from bench.procs import ServerChild, free_port

WORK_SECONDS = 0.1
PODS = 4
# name: (routers, workers each)
SET_UPS = {"three routers": (3, 1), "one router, --workers 3": (1, 3)}
PLACING_TRIES = 200


def router_command(source: Path | None) -> list[str]:
    """`python -m router`, or the same from the checkout `source`: put first on sys.path
    (the worker processes inherit it), since `-m` would put the working directory first."""
    if source is None:
        return [sys.executable, "-m", "router"]
    return [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(source)!r}); "
            "from router.__main__ import main; main()"]


def start_routers(command: list[str], pods: CapacityOnePods, routers: int, workers: int,
                  logs: Path, stack: ExitStack) -> list[ServerChild]:
    """`routers` router commands over the pods, all up before any request."""
    listed = ",".join(f"pod-{i}={ip}:{port}" for i, (ip, port) in enumerate(pods.ports))
    children = []
    for index in range(routers):
        port = free_port()
        argv = [*command, "--host", "127.0.0.1", "--port", str(port),
                "--pods", listed, "--metrics-port", "0", "--no-access-log",
                "--log-level", "warning", "--drain-grace", "0", "--workers", str(workers),
                "--timeout-keep-alive", "60"]  # the first connection waits while placing
        children.append(stack.enter_context(
            ServerChild(f"router-{index}", argv, logs / f"router-{index}.log", port, "/ready")))
    return children


def connect(routers: list[ServerChild], clients: int, workers: int) -> list[HTTPConnection]:
    """One keep-alive connection per client: client i's to router i % routers, or with
    `--workers`, held by worker i % workers. The workers share the listening socket and
    the kernel hands each new connection to whichever accepts first (often one worker
    takes them all), so connections are opened, their worker found by its socket, and
    those that landed on the wrong worker closed, until each client has its own."""
    if workers == 1:
        return [_open(routers[i % len(routers)].port)[0] for i in range(clients)]
    router = routers[0]
    owners = sorted((child for child in psutil.Process(router.pid).children()
                     if _sockets(child, router.port)), key=lambda child: child.pid)
    placed: list[HTTPConnection] = []
    for _ in range(PLACING_TRIES):
        if len(placed) == clients:
            return placed
        connection, local = _open(router.port)
        if (owners[len(placed) % workers].pid, local) in _held(owners, router.port):
            placed.append(connection)
        else:
            connection.close()
    raise RuntimeError(f"could not place {clients} connections on {workers} workers")


def _open(port: int) -> tuple[HTTPConnection, int]:
    """A connection the router has accepted (a probe answered on it), and its local port."""
    connection = HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", "/healthz")
    connection.getresponse().read()
    assert connection.sock is not None
    return connection, connection.sock.getsockname()[1]


def _sockets(process: psutil.Process, port: int) -> list[Any]:
    return [c for c in process.net_connections("tcp") if c.laddr.port == port]


def _held(owners: list[psutil.Process], port: int) -> set[tuple[int, int]]:
    """(worker PID, client port) of every connection the workers hold."""
    return {(owner.pid, c.raddr.port) for owner in owners for c in _sockets(owner, port)
            if c.raddr}


def measure(connections: list[HTTPConnection], seconds: float) -> list[int]:
    """Each client sends one GET after another on its connection until `seconds` are up;
    every status they saw."""
    statuses: list[int] = []
    deadline = time.monotonic() + seconds

    def client(connection: HTTPConnection) -> None:
        try:
            while time.monotonic() < deadline:
                connection.request("GET", "/")
                response = connection.getresponse()
                response.read()
                statuses.append(response.status)
        finally:
            connection.close()

    threads = [threading.Thread(target=client, args=(c,)) for c in connections]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.spread", description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0, help="per cell")
    parser.add_argument("--clients", default="2,3,4", help="comma-separated client counts")
    parser.add_argument("--router-src", type=Path, metavar="DIR",
                        help="run the routers from this checkout instead")
    args = parser.parse_args(argv)
    command = router_command(args.router_src.resolve() if args.router_src else None)
    pods = CapacityOnePods(PODS, (WORK_SECONDS, WORK_SECONDS))
    print_header("set-up", "clients (load)")
    try:
        for name, (routers, workers) in SET_UPS.items():
            for clients in (int(c) for c in args.clients.split(",")):
                with ExitStack() as stack, tempfile.TemporaryDirectory() as logs:
                    routed = start_routers(command, pods, routers, workers, Path(logs),
                                           stack)
                    connections = connect(routed, clients, workers)
                    busy_before = pods.busy
                    statuses = measure(connections, args.seconds)
                    wasted = pods.busy - busy_before
                print_row(name, f"{clients} ({clients * 100 // PODS}%)",
                          ok=statuses.count(200), busy=statuses.count(503), wasted=wasted,
                          requests=len(statuses))
    finally:
        pods.stop()


if __name__ == "__main__":
    main()
