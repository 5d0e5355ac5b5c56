"""`python -m bench.spread`: do many routers over one pool stay spread out, or do they walk
the pool in lockstep and collide on busy pods? Four capacity-1 pods (each works 0.1 s on one
request and answers 503 to any other meanwhile, `bench/cooldown.py`), in front of them the
real command, `python -m router --pods ...`, as three router processes with clients spread
over them, then as one router with `--workers 3`; 2, 3 and 4 clients (50%, 75% and 100% of
the pool's capacity), each sending one request after another. For each: the clients' 200s
and 503s, and the attempts wasted on busy pods per request (the pods' own 503 count).

`--router-src DIR` runs the routers from another checkout (its `router` package first on
PYTHONPATH), for the figures before a change.
"""

from __future__ import annotations

import argparse
import http.client
import os
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from bench.cooldown import CapacityOnePods
from bench.procs import ServerChild, free_port

WORK_SECONDS = 0.1
PODS = 4
# name: (routers, workers each). The workers of one router share its listening socket, and
# the kernel hands each new connection to one of them: so there, every request comes on a
# new connection, or all three clients could stay with the worker that accepted them.
SET_UPS = {"three routers": (3, 1), "one router, --workers 3": (1, 3)}


def start_routers(pods: CapacityOnePods, routers: int, workers: int,
                  logs: Path, stack: ExitStack) -> list[int]:
    """`routers` router commands over the pods, started together; their ports."""
    listed = ",".join(f"pod-{i}={ip}:{port}" for i, (ip, port) in enumerate(pods.ports))
    ports = []
    for index in range(routers):
        port = free_port()
        argv = [sys.executable, "-m", "router", "--host", "127.0.0.1", "--port", str(port),
                "--pods", listed, "--metrics-port", "0", "--no-access-log",
                "--log-level", "warning", "--drain-grace", "0", "--workers", str(workers)]
        stack.enter_context(ServerChild(f"router-{index}", argv, logs / f"router-{index}.log",
                                        port, "/ready"))
        ports.append(port)
    return ports


def measure(ports: list[int], clients: int, seconds: float, reconnect: bool) -> list[int]:
    """`clients` clients, client i on `ports[i % len(ports)]`, each sending one GET after
    another until `seconds` are up, on one keep-alive connection or (`reconnect`) each on
    a new one; every status they saw."""
    statuses: list[int] = []
    deadline = time.monotonic() + seconds

    def client(port: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            while time.monotonic() < deadline:
                connection.request("GET", "/", headers={"Connection": "close"} if reconnect
                                   else {})
                response = connection.getresponse()
                response.read()
                statuses.append(response.status)
                if reconnect:
                    connection.close()
        finally:
            connection.close()

    threads = [threading.Thread(target=client, args=(ports[i % len(ports)],))
               for i in range(clients)]
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
    if args.router_src is not None:  # children only: this process has imported its own
        os.environ["PYTHONPATH"] = str(args.router_src.resolve())
    pods = CapacityOnePods(PODS, (WORK_SECONDS, WORK_SECONDS))
    print("| set-up | clients (load) | client 200s | client 503s "
          "| wasted attempts / request |")
    print("|---|---|---|---|---|")
    try:
        for name, (routers, workers) in SET_UPS.items():
            for clients in (int(c) for c in args.clients.split(",")):
                with ExitStack() as stack, tempfile.TemporaryDirectory() as logs:
                    ports = start_routers(pods, routers, workers, Path(logs), stack)
                    busy_before = pods.busy
                    statuses = measure(ports, clients, args.seconds, reconnect=workers > 1)
                    wasted = pods.busy - busy_before
                ok, busy = statuses.count(200), statuses.count(503)
                print(f"| {name} | {clients} ({clients * 100 // PODS}%) | {ok} | {busy} | "
                      f"{wasted / max(len(statuses), 1):.2f} |", flush=True)
    finally:
        pods.stop()


if __name__ == "__main__":
    main()
