"""`python -m bench.held`: what one held client connection costs the router, in each state a
hostile client can hold it in. Prints a Markdown table: state, connections held, router
RSS, RSS per connection, the router's own socket memory in the kernel (charged to its
memory cgroup, as RSS is) and the machine's TCP memory (`/proc/net/sockstat`), and how
fast this client opened them.

For each state a fresh router (`python -m router --pods ... --no-access-log
--metrics-port 0`) over one raw pod on 127.0.0.2 (`python -m bench.held pod MODE PORT`, a
process of its own), and this process as the client: raw non-blocking sockets, bound to
source addresses in 127.1.0.0/16, 64 per address (`--upgrade-max-per-client`'s default),
as many addresses would. Connections are added up to each level of `--levels` (light
states) or `--heavy-levels` (states that hold body bytes); at each, once the router holds
every connection (its descriptors) and its RSS has settled, a row.

The router runs with every wait raised to 600 s (`--header-timeout`, `--body-timeout`,
`--send-timeout`, `--proxy-timeout`), so that nothing expires while a level is built:
what a connection costs does not depend on how long it may be held; how long a default
router holds each state is the timeout the table names, and the connection rate says how
many one client opens in that time. The descriptor limit of this process and so the
router's is raised to `--nofile` (1,048,576 by default, common in containers; root may
raise the hard limit).

States:
- idle: connected, nothing sent (`--header-timeout`, 10 s).
- head: 1 KiB of a request head sent, the head never finished (`--header-timeout`).
- head-32k: as much of a head as `--max-request-head` (32 KiB) allows, unfinished.
- get-silent: a whole GET sent to a pod that reads and never answers (`--proxy-timeout`,
  180 s).
- post-1m-silent: a 1 MiB POST (exactly `--retry-body-limit`, so the router keeps it
  whole to retry a busy pod) sent whole to the silent pod (`--proxy-timeout`).
- post-1m-held: the same POST less its last 64 bytes, no pod involved yet: the router
  reads a replayable body whole before the first attempt (`--body-timeout`, 60 s between
  reads, so a byte a minute holds it).
- upload: a 64 MiB streamed POST, the pod reading its head and then nothing; the client
  sends until its socket blocks (`--body-timeout`, reset by each byte the router reads).
- unread: a GET whose pod answers an endless body the client never reads
  (`--send-timeout`, 60 s; this client's receive buffer is 4 KiB, as a remote client's
  buffers are not on this machine; the pod's send buffer is 64 KiB).
- tunnel: an upgrade answered 101 by the pod, then silent both ways
  (`--upgrade-idle-timeout`, 3600 s; `--upgrade-max`).

Each state stops before a level at which the router's RSS would pass `--rss-cap` or
the machine's TCP memory would pass half its pressure threshold (`net.ipv4.tcp_mem`): the
machine is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import os
import re
import resource
import selectors
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import psutil

from bench.procs import Child, ServerChild, free_port

POD_IP = "127.0.0.2"
MiB = 1024 * 1024
PER_SOURCE = 64
CONNECTING = 512  # connects in flight at once: under the router's listen backlog (2048)
LONG = "600"
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class State:
    name: str
    pod: str  # the pod's mode
    heavy: bool  # holds body bytes: the smaller levels
    paired: bool  # holds a pod connection: two router descriptors each
    bound: str  # what ends it in a default router


STATES = {s.name: s for s in (
    State("idle", "silent", False, False, "--header-timeout 10 s"),
    State("head", "silent", False, False, "--header-timeout 10 s"),
    State("head-32k", "silent", False, False, "--header-timeout 10 s"),
    State("get-silent", "silent", False, True, "--proxy-timeout 180 s"),
    State("post-1m-silent", "silent", True, True, "--proxy-timeout 180 s"),
    State("post-1m-held", "silent", True, False, "--body-timeout 60 s between reads"),
    State("upload", "stall", True, True, "--body-timeout 60 s between reads"),
    State("unread", "stream", True, True, "--send-timeout 60 s"),
    State("tunnel", "upgrade", False, True, "--upgrade-idle-timeout 3600 s"),
)}

ONE_MIB_HEAD = (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n")
UPLOAD_HEAD = (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 67108864\r\n\r\n")
PIECE = b"x" * (256 * 1024)


def _payload(state: str) -> tuple[bytes, int]:
    """What the client sends first, and how many more body bytes it pushes after it
    (sent from `PIECE` while the socket takes them)."""
    get = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    if state == "idle":
        return b"", 0
    if state == "head":
        return b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 1000, 0
    if state == "head-32k":
        return b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * (32 * 1024 - 200), 0
    if state in ("get-silent", "unread"):
        return get, 0
    if state == "post-1m-silent":
        return ONE_MIB_HEAD, MiB
    if state == "post-1m-held":
        return ONE_MIB_HEAD, MiB - 64
    if state == "upload":
        return UPLOAD_HEAD, 64 * MiB
    if state == "tunnel":
        return (b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"\r\n"), 0
    raise ValueError(state)


# -- the pod: one process, asyncio, as many connections as the router opens --

class _PodProtocol(asyncio.Protocol):
    mode = "silent"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.head = b""
        self.answered = False
        self.paused = False
        if self.mode == "stall":  # reads nothing more: the router's body waits
            asyncio.get_running_loop().call_soon(self.transport.pause_reading)

    def data_received(self, data: bytes) -> None:
        if self.mode == "stall":
            self.transport.pause_reading()
            return
        if self.answered or self.mode == "silent":
            return
        self.head += data
        if b"\r\n\r\n" not in self.head:
            return
        self.answered = True
        if self.mode == "upgrade":
            self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                 b"Connection: Upgrade\r\n\r\n")
        elif self.mode == "stream":
            self.transport.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            self._more()

    def _more(self) -> None:
        while not self.paused and not self.transport.is_closing():
            self.transport.write(b"10000\r\n" + PIECE[:0x10000] + b"\r\n")

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._more()


async def _pod(mode: str, port: int) -> None:
    _PodProtocol.mode = mode
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if mode == "stream":  # bounds what this pod parks in the kernel: the router's side counts
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    if mode == "stall":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.bind((POD_IP, port))
    sock.listen(4096)
    server = await asyncio.get_running_loop().create_server(_PodProtocol, sock=sock,
                                                               backlog=4096)
    async with server:
        await server.serve_forever()


# -- measuring --

def _sockstat_pages() -> int:
    text = Path("/proc/net/sockstat").read_text()
    match = re.search(r"^TCP:.* mem (\d+)", text, re.MULTILINE)
    return int(match.group(1)) if match else 0


def _tcp_pressure_pages() -> int:
    return int(Path("/proc/sys/net/ipv4/tcp_mem").read_text().split()[1])


def _router_socket_bytes(pid: int) -> int:
    """The kernel memory of the router's TCP sockets (`ss -tm`: receive queue, send
    queue and forward allocation), what a memory cgroup is charged for them."""
    out = subprocess.run(["ss", "-tnmpH"], capture_output=True, text=True, check=True).stdout
    total = 0
    mine = False
    marker = f"pid={pid},"
    for line in out.splitlines():
        if "skmem:(" not in line:
            mine = marker in line
            continue
        if marker in line:
            mine = True
        if mine:
            fields = dict(re.findall(r"\b(r|w|f|t)(\d+)", line.split("skmem:(", 1)[1]))
            total += int(fields.get("r", 0)) + int(fields.get("w", 0)) + int(fields.get("f", 0))
        mine = False
    return total


class Clients:
    """The client ends: non-blocking sockets, driven by one selector until every one has
    connected and sent what its state sends."""

    def __init__(self, port: int, state: str) -> None:
        self.port = port
        self.state = state
        self.first, self.body = _payload(state)
        self.socks: list[socket.socket] = []
        self.selector = selectors.DefaultSelector()
        self.failed = 0

    def _source(self, index: int) -> str:
        n = index // PER_SOURCE + 1
        return f"127.1.{n // 256}.{n % 256}"

    def open(self, count: int) -> float:
        """Opens `count` more connections; returns the seconds until each had connected
        and sent its first bytes."""
        started = time.monotonic()
        todo = list(range(len(self.socks), len(self.socks) + count))
        pending: dict[int, list[object]] = {}  # fd -> [sock, unsent first, body left]
        filling: dict[int, list[object]] = {}  # uploads whose head went, body still going
        deadline = started + 120
        while (todo or pending) and time.monotonic() < deadline:
            while todo and len(pending) < CONNECTING:
                sock = socket.socket()
                if self.state == "unread":
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.bind((self._source(todo.pop(0)), 0))
                sock.setblocking(False)
                code = sock.connect_ex(("127.0.0.1", self.port))
                if code not in (0, errno.EINPROGRESS):
                    self.failed += 1
                    sock.close()
                    continue
                self.socks.append(sock)
                pending[sock.fileno()] = [sock, self.first, self.body]
                self.selector.register(sock, selectors.EVENT_WRITE)
            for key, _ in self.selector.select(timeout=1.0):
                entry = pending[key.fd]
                if self._push(cast(socket.socket, entry[0]), entry):
                    self.selector.unregister(key.fileobj)
                    del pending[key.fd]
                elif self.state == "upload" and not entry[1]:
                    filling[key.fd] = pending.pop(key.fd)  # the head went: a level counts
        seconds = time.monotonic() - started
        pending.update(filling)
        if self.state == "upload":
            self._fill(pending)
        for fd in pending:  # sent what the socket took: held as it is
            self.selector.unregister(fd)
        return seconds

    def _fill(self, pending: dict[int, list[object]]) -> None:
        """Uploads: keeps sending while any socket takes more (the router reads, the pod
        does not), until none has for two seconds: every buffer on the way is full."""
        deadline = time.monotonic() + 60
        quiet = 0
        while pending and quiet < 2 and time.monotonic() < deadline:
            ready = self.selector.select(timeout=1.0)
            quiet = 0 if ready else quiet + 1
            for key, _ in ready:
                entry = pending[key.fd]
                sock = entry[0]
                assert isinstance(sock, socket.socket)
                self._push(sock, entry)

    def _push(self, sock: socket.socket, entry: list[object]) -> bool:
        """Sends what is left; True when nothing more goes now (all sent, or the socket
        is full after the head, as an upload held against a stalled pod is)."""
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            self.failed += 1
            return True
        first = entry[1]
        assert isinstance(first, bytes)
        body = entry[2]
        assert isinstance(body, int)
        try:
            if first:
                sent = sock.send(first)
                entry[1] = first = first[sent:]
                if first:
                    return False
            while body > 0:
                sent = sock.send(PIECE[:min(body, len(PIECE))])
                entry[2] = body = body - sent
        except BlockingIOError:
            return False  # full for now: sent again when it takes more
        except OSError:
            self.failed += 1
            return True
        return True

    def close(self) -> None:
        for sock in self.socks:
            sock.close()
        self.selector.close()


def _settle(router: psutil.Process, want_fds: int, deadline: float) -> tuple[int, int]:
    """Waits (bounded) until the router has at least `want_fds` descriptors and its RSS
    has stopped moving; returns (RSS, descriptors)."""
    last = -1
    steady = 0
    while time.monotonic() < deadline:
        rss = router.memory_info().rss
        fds = router.num_fds()
        if fds >= want_fds and last >= 0 and abs(rss - last) < max(256 * 1024, rss // 200):
            steady += 1
            if steady >= 3:
                return rss, fds
        else:
            steady = 0
        last = rss
        time.sleep(0.5)
    return router.memory_info().rss, router.num_fds()


@dataclass
class Row:
    state: str
    held: int
    rss: int
    base: int
    socket_bytes: int
    sockstat_delta: int
    rate: float
    fds: int
    note: str = ""


def measure(state: State, levels: Sequence[int], workdir: Path, rss_cap: int,
            extra: Sequence[str]) -> list[Row]:
    pod_port = free_port([POD_IP])
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    pod = Child(f"pod-{state.name}", [sys.executable, "-P", "-m", "bench.held", "pod",
                                      state.pod, str(pod_port)],
                workdir / f"pod-{state.name}.log", env=env)
    rows: list[Row] = []
    clients = Clients(port, state.name)
    try:
        argv = [sys.executable, "-P", "-m", "router", "--host", "127.0.0.1", "--port",
                str(port), "--pods", f"p={POD_IP}:{pod_port}", "--metrics-port", "0",
                "--no-access-log", "--log-level", "error",
                "--header-timeout", LONG, "--body-timeout", LONG, "--send-timeout", LONG,
                "--proxy-timeout", LONG, *extra]
        if state.name == "tunnel":  # its default, a quarter of the descriptors, is less
            argv += ["--upgrade-max", str(max(levels))]
        with ServerChild(f"router-{state.name}", argv, workdir / f"router-{state.name}.log",
                         port, "/ready", env=env) as router:
            proc = psutil.Process(router.pid)
            base_rss, base_fds = _settle(proc, 0, time.monotonic() + 10)
            base_mem = _sockstat_pages()
            per = 2 if state.paired else 1
            limit = _tcp_pressure_pages() // 2
            for level in levels:
                opened = level - len(clients.socks)
                seconds = clients.open(opened)
                rss, fds = _settle(proc, base_fds + per * (len(clients.socks) - clients.failed),
                                   time.monotonic() + 60)
                held = (fds - base_fds) // per
                rows.append(Row(state.name, held, rss, base_rss, _router_socket_bytes(proc.pid),
                                (_sockstat_pages() - base_mem) * PAGE,
                                opened / seconds, fds,
                                f"{clients.failed} failed" if clients.failed else ""))
                print(_line(rows[-1]), flush=True)
                growth = max(level, 1)
                nxt = next((n for n in levels if n > level), level)
                used = _sockstat_pages() - base_mem
                if (base_rss + (rss - base_rss) * nxt / growth > rss_cap
                        or base_mem + used * nxt / growth > limit):
                    rows[-1].note += " (next level would pass a cap: stopped)"
                    break
    finally:
        clients.close()
        pod.stop()
    return rows


def _line(row: Row) -> str:
    per_conn = (row.rss - row.base) / max(row.held, 1) / 1024
    return (f"| {row.state} | {row.held:,} | {row.rss / MiB:,.0f} | {per_conn:,.1f} | "
            f"{row.socket_bytes / max(row.held, 1) / 1024:,.1f} | "
            f"{row.sockstat_delta / MiB:,.0f} | {row.rate:,.0f} | {row.note} |")


HEADER = ("| state | held | router RSS MiB | RSS / connection KiB (over idle router) | "
          "router socket memory / connection KiB | machine TCP memory delta MiB | "
          "connections/s opened | note |\n|---|---|---|---|---|---|---|---|")


def main(argv: Sequence[str] | None = None) -> None:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "pod":
        with contextlib.suppress(ImportError):
            import uvloop
            uvloop.install()
        asyncio.run(_pod(argv[1], int(argv[2])))
        return
    parser = argparse.ArgumentParser(prog="python -m bench.held", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--states", default=",".join(STATES))
    parser.add_argument("--levels", default="1000,5000,10000,18000")
    parser.add_argument("--heavy-levels", default="250,500,1000",
                        help="states holding body bytes in the router's memory")
    parser.add_argument("--kernel-levels", default="25,50,100",
                        help="states holding megabytes in socket buffers (upload, unread)")
    parser.add_argument("--paired-levels", default="1000,5000,9000",
                        help="light states holding a pod connection (two descriptors each)")
    parser.add_argument("--rss-cap", type=int, default=1536, help="MiB")
    parser.add_argument("--nofile", type=int, default=1 << 20)
    parser.add_argument("--keep", help="a directory for the processes' logs, kept")
    parser.add_argument("--router-args", default="", help="more router flags, one string")
    args = parser.parse_args(argv)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (args.nofile, args.nofile))
    print(f"descriptor limit {resource.getrlimit(resource.RLIMIT_NOFILE)}", flush=True)
    print(HEADER, flush=True)
    rows: list[Row] = []
    with contextlib.ExitStack() as stack:
        tmp = args.keep or stack.enter_context(tempfile.TemporaryDirectory(prefix="held-"))
        for name in args.states.split(","):
            state = STATES[name]
            text = (args.kernel_levels if state.name in ("upload", "unread") else
                    args.heavy_levels if state.heavy else
                    args.paired_levels if state.paired else args.levels)
            levels = [int(n) for n in text.split(",")]
            rows += measure(state, levels, Path(tmp), args.rss_cap * MiB,
                            args.router_args.split())
    print("\nWhat ends each state in a default router:")
    for state in STATES.values():
        print(f"- {state.name}: {state.bound}")


if __name__ == "__main__":
    main()
