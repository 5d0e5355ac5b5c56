"""`python -m bench.instructions`: what one small proxied GET costs the router, counted
rather than timed. On this shared two-core machine req/s and CPU time move by 10-40% from
one cell to the next, more than the changes they are meant to judge; valgrind's callgrind
counts the same for the same code and load whatever else the machine does.

The router (`python -m router` over three nginx pods, bench/nginx.py; no metrics or access
log, unless `--observability`) runs under `valgrind --tool=callgrind --cache-sim=yes`.
For each concurrency c, a client opens c keep-alive connections and sends requests on all
of them until every connection and the router's pod pool are warm; then the counters are
zeroed, `--requests` GETs go through (the same number on each connection), and the
counters are dumped. Per request:

- instructions: the router's own work, Python and C (the kernel's is not counted);
- L2 misses: reads, writes and instruction fetches that missed a simulated second-level
  cache of `--l2` bytes (1 MiB: this machine's per-core L2; valgrind models two levels and
  by default takes the 32 MiB L3 as the last one, which no request here misses). At high
  concurrency these are what grows: the requests in flight together touch more memory
  than the cache holds (#13).

`--compare COMMIT|DIR` counts that router too, in the same run: the 5% budget.
About a minute per router and concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from bench import nginx
from bench.nginx import Pod
from bench.procs import Child, free_port
from bench.router import router_command, source_tree

GET = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
WARM_REQUESTS = 400
"""Requests before counting (at least two per connection)."""
START_SECONDS = 300.0
"""A router under valgrind takes tens of seconds to start."""
CHECKOUT = Path(__file__).resolve().parent.parent
MISSES = ("ILmr", "DLmr", "DLmw")
"""callgrind's names for misses of the last simulated cache level."""


@dataclass(frozen=True)
class Count:
    router: str
    concurrency: int
    requests: int
    instructions: float
    l2_misses: float
    missing: list[tuple[float, str]]
    """The C functions with the most L2 misses per request (`--top`)."""


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(GET)
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200 "):
        raise RuntimeError(f"the router answered {head[:40]!r}")
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    await reader.readexactly(length)


async def _requests(connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]],
                    each: int) -> None:
    """`each` requests on every connection, one after another on each."""
    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(each):
            await _exchange(reader, writer)
    await asyncio.gather(*(one(reader, writer) for reader, writer in connections))


def _callgrind(pid: int, *command: str) -> None:
    subprocess.run(["callgrind_control", *command, str(pid)], check=True,
                   capture_output=True, timeout=START_SECONDS)


def _last_dump(directory: Path, pid: int) -> Path:
    return max(directory.glob(f"callgrind.{pid}.*"), key=lambda p: int(p.suffix[1:]))


def _dumped(dump: Path) -> dict[str, int]:
    """The totals of a dump, by event name."""
    events: list[str] = []
    totals: list[int] = []
    for line in dump.read_text().splitlines():
        if line.startswith("events:"):
            events = line.split()[1:]
        elif line.startswith(("summary:", "totals:")):
            totals = [int(value) for value in line.split()[1:]]
    return dict(zip(events, totals, strict=True))


def _missing(dump: Path, count: int) -> list[tuple[int, str]]:
    """The `count` functions with the most L2 misses of their own in a dump (not of what
    they call), most first. callgrind_annotate 3.19 folds these dumps into one function;
    the format is simple: `fn=` names the function the cost lines below it belong to,
    and the line after each `calls=` is the cost of a call, not the function's own."""
    events: list[str] = []
    function = ""
    a_call = False
    own: dict[str, int] = {}
    for line in dump.read_text().splitlines():
        if line.startswith("events:"):
            events = line.split()[1:]
        elif line.startswith("fn="):
            function = line[3:]
        elif line.startswith("calls="):
            a_call = True
        elif line[:1].isdigit() or line[:1] in "+-*":
            if a_call:
                a_call = False
                continue
            costs = dict(zip(events, line.split()[1:], strict=False))
            own[function] = own.get(function, 0) + sum(int(costs.get(e, 0)) for e in MISSES)
    return sorted(((misses, name) for name, misses in own.items()), reverse=True)[:count]


async def _count(name: str, pid: int, port: int, concurrency: int, requests: int,
                 directory: Path, top: int) -> Count:
    connections = [await asyncio.open_connection("127.0.0.1", port)
                   for _ in range(concurrency)]
    try:
        await _requests(connections, max(2, WARM_REQUESTS // concurrency))
        await asyncio.to_thread(_callgrind, pid, "--zero")
        each = max(1, requests // concurrency)
        await _requests(connections, each)
        await asyncio.to_thread(_callgrind, pid, "--dump", f"c={concurrency}")
    finally:
        for _, writer in connections:
            writer.close()
    dump = _last_dump(directory, pid)
    totals = _dumped(dump)
    done = each * concurrency
    return Count(name, concurrency, done, totals["Ir"] / done,
                 sum(totals[event] for event in MISSES) / done,
                 [(misses / done, function) for misses, function in _missing(dump, top)])


def measure(name: str, source: Path | None, pods: list[Pod], concurrency: list[int],
            requests: int, l2: int, workdir: Path, observability: bool,
            top: int) -> list[Count]:
    directory = workdir / name
    directory.mkdir()
    port = free_port()
    argv = [
        "valgrind", "--tool=callgrind", "--cache-sim=yes", f"--LL={l2},16,64",
        "--compress-strings=no",  # each dump readable on its own (`--keep`, `--top`)
        f"--callgrind-out-file={directory}/callgrind.%p",
        *router_command(port, pods, observability, free_port()),
        # Under callgrind a turn of the loop takes ~50 times as long: the 5 s keep-alive
        # and 10 s head limits would close connections whose next request waits unread.
        "--timeout-keep-alive", "600", "--header-timeout", "600",
    ]
    env = {**os.environ, "PYTHONPATH": str(source or CHECKOUT)}
    with Child(name, argv, directory / "router.log", env) as router:
        router.wait_ready(f"http://127.0.0.1:{port}/ready", timeout=START_SECONDS)
        return [asyncio.run(_count(name, router.pid, port, c, requests, directory, top))
                for c in concurrency]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="16,256")
    parser.add_argument("--requests", type=int, default=2048, help="counted, per concurrency")
    parser.add_argument("--l2", type=int, default=1 << 20, help="simulated L2 bytes")
    parser.add_argument("--compare", default="", metavar="COMMIT|DIR")
    parser.add_argument("--observability", action="store_true",
                        help="the operator defaults: metrics served, access log (to /dev/null)")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="keep callgrind's dumps here (DIR/ROUTER/callgrind.PID.N, N "
                             "in --concurrency order)")
    parser.add_argument("--top", type=int, default=0, metavar="N",
                        help="also list the N C functions with the most L2 misses per "
                             "request, at each concurrency")
    args = parser.parse_args()
    concurrency = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory(prefix="warmpool-instructions-") as tmp, \
            ExitStack() as stack:
        workdir = Path(tmp)
        if args.keep:
            args.keep.mkdir(parents=True)
            workdir = args.keep
        big = workdir / "big"  # the pods' download, not asked for here
        big.write_bytes(b"")
        pods = [Pod(f"pod-{i}", f"127.0.0.{i + 2}", free_port([f"127.0.0.{i + 2}"]))
                for i in range(3)]
        for pod in pods:
            stack.enter_context(nginx.start_pod(pod, workdir, big))
        routers: list[tuple[str, Path | None]] = [("router", None)]
        if args.compare:
            routers.append((f"router@{Path(args.compare).name}",
                            source_tree(args.compare, workdir)))
        counts = [count for name, source in routers
                  for count in measure(name.replace("/", "_"), source, pods, concurrency,
                                       args.requests, args.l2, workdir, args.observability,
                                       args.top)]
    print(f"| router | c | requests | instructions / request | L2 misses / request "
          f"({args.l2 // 1024} KiB) |")
    print("|---|---|---|---|---|")
    for count in counts:
        print(f"| {count.router} | {count.concurrency} | {count.requests:,} | "
              f"{count.instructions:,.0f} | {count.l2_misses:,.0f} |")
    for count in counts:
        if count.missing:
            print(f"\n{count.router}, c={count.concurrency}: L2 misses per request, by C "
                  "function (its own, not what it calls)")
            for misses, function in count.missing:
                print(f"{misses:8.1f}  {function}")
    this = {c.concurrency: c for c in counts if c.router == "router"}
    for count in counts:
        if count.router != "router":
            mine = this[count.concurrency]
            print(f"c={count.concurrency}: instructions router ÷ {count.router} = "
                  f"{mine.instructions / count.instructions:.3f}")
    for c in concurrency[1:]:
        print(f"router: c={c} ÷ c={concurrency[0]}: instructions "
              f"{this[c].instructions / this[concurrency[0]].instructions:.3f}, L2 misses "
              f"{this[c].l2_misses / max(this[concurrency[0]].l2_misses, 1):.1f}")


if __name__ == "__main__":
    main()
