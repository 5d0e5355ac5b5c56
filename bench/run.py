"""`make bench`: the router against nginx (the reference round-robin proxy) and against
the direct path to one pod, over nginx pods on 127.0.0.2-5. Prints one Markdown table and
the target checks, and writes everything to bench/results/<timestamp>.json.

At c=64 and c=256 the small GET also measures three uvicorn references (bench/floor.py):
uvicorn answering by itself, and bare round-robin proxies on aiohttp's and httpx's clients,
so the table shows what any uvicorn-based proxy reaches on this machine.

Cells are interleaved (for each concurrency, every target in turn) so drift of the
machine hits all targets alike; the ratios quoted come from one run. Each wrk cell
follows an uncounted warm-up at the same concurrency, so the proxies' connection pools
are filled; "new upstream connections" is counted by the pods while the load is steady
(over the second half of the cell, up to half a second before its end), and over the
whole cell.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import psutil

from bench import host, nginx, pyspy, report, transfer, wrk
from bench.floor import FloorProcess
from bench.nginx import Pod
from bench.procs import free_port
from bench.report import Check, Row
from bench.router import RouterProcess, source_tree
from bench.usage import Usage

RESULTS = Path(__file__).with_name("results")
DIRECT, NGINX, ROUTER, ROUTER_OBS = "direct", "nginx", "router", "router+obs"
FLOOR = "floor"  # the uvicorn references; their names must not start with ROUTER
# (name, bench.floor kind, whether it forwards to the pods, the concurrencies measured).
# httpx stops at c=64: at c=256 it collapses (from ~400 down to ~11 req/s in our runs,
# varying run to run; see encode/httpx#3215), a cell that says no more than c=64 does.
FLOORS = (
    ("uvicorn hello (no upstream)", "hello", False, (64, 256)),
    ("bare proxy: uvicorn+aiohttp", "proxy", True, (64, 256)),
    ("bare proxy: uvicorn+httpx", "httpx", True, (64,)),
)
# The 64 MiB transfers' floor: relays with no HTTP (bench/relay.py).
RELAY_FLOORS = (("byte relay: uvloop", "relay"), ("byte relay: splice(2)", "splice"))
PAIRED_CELL = "GET 100 B, c=16 then c=256"
BUDGET_CELL = "GET 100 B, router and base router back to back"
BUSY_CELL = "GET 100 B, pool of 3 + 1 always-503"
DEAD_CELL = "GET 100 B, pool of 3 + 1 refusing connections"
# The parts of a run, for --only.
PARTS = ("small", "transfers", "busy", "dead")


@dataclass(frozen=True)
class Settings:
    duration: int  # the small GET's cells; wrk takes whole seconds
    warmup: int
    threads: int
    concurrency: tuple[int, ...]
    busy_connections: int
    reps: int
    parts: tuple[str, ...] = PARTS
    degraded_duration: int = 5  # the busy-pool and dead-pod cells
    workers: int = 2  # also measure `--workers N` on the small GET (below 2: not)
    compare: str = ""  # also measure the router of this commit or source tree ("": not)
    pairs: int = 2  # router cells at c=16 then c=256, back to back, for the goal's ratio


@dataclass(frozen=True)
class Target:
    """Where load goes. `pid` is the proxy process measured (none for the direct path);
    connections accepted by `pods` during a cell are the proxy's new upstream ones."""

    name: str
    kind: str  # DIRECT, NGINX, ROUTER or FLOOR
    url: str
    pid: int | None
    pods: tuple[Pod, ...]


def measure(target: Target, path: str, cell: str, c: int, s: Settings,
            duration: int) -> Row:
    url = target.url + path
    if s.warmup:
        wrk.run(url, c, s.warmup, s.threads)
    pods = target.pods
    before = nginx.tally(pods)
    with Usage(target.pid) as usage, wrk.Load(url, c, duration, s.threads) as load:
        first, last = _steady_window(pods, duration) if pods else (before, before)
        result = load.wait()
    steady = whole = None
    if pods and result.requests:
        window = last.since(first, pods)
        steady = window.accepts / window.requests * 1000 if window.requests > 0 else None
        # Three reads in the cell: each counted one connection per pod.
        new = nginx.tally(pods).accepts - before.accepts - 3 * len(pods)
        whole = new / result.requests * 1000
    row = Row(
        cell=cell, target=target.name, connections=c, throughput=result.rps, unit="req/s",
        requests=result.requests, p50_ms=result.p50_ms, p99_ms=result.p99_ms,
        errors=result.socket_errors, non_2xx=result.non_2xx,
        cpu_seconds=usage.cpu_seconds if target.pid else None,
        cpu_us_per_request=(usage.cpu_seconds / result.requests * 1e6
                            if target.pid and result.requests else None),
        cpu_cores=usage.cpu_seconds / result.seconds if target.pid and result.seconds else None,
        peak_rss_mib=usage.peak_rss_mib if target.pid else None,
        upstream_conns_per_1k=steady, upstream_conns_per_1k_cell=whole,
    )
    cpu = f", {row.cpu_us_per_request:.1f} µs CPU/req" if row.cpu_us_per_request else ""
    print(f"  {cell} c={c} {target.name}: {result.rps:,.0f} req/s{cpu}, "
          f"p99 {result.p99_ms:.2f} ms", file=sys.stderr, flush=True)
    return row


def _steady_window(pods: Sequence[Pod], duration: int) -> tuple[nginx.Tally, nginx.Tally]:
    """The pods' counts halfway through the cell and just before it ends: the load is steady
    in between. Outside: the pool growing back after the warm-up's clients left with
    requests in flight (at c=256 that takes the router up to about 1.5 s), and this cell's
    own ending."""
    time.sleep(duration / 2)
    first = nginx.tally(pods)
    time.sleep(duration / 2 - min(0.5, duration / 4))
    return first, nginx.tally(pods)


def workers_name(workers: int) -> str:
    return f"{ROUTER} --workers {workers}"


def base_name(compare: str) -> str:
    """Not starting with `ROUTER`: this branch's checks do not hold an earlier one."""
    return f"base router @{Path(compare).name if Path(compare).is_dir() else compare}"


def _ratio(value: float, reference: float) -> float | None:
    return value / reference if reference else None


def small_gets(targets: Sequence[Target], floors: Sequence[tuple[Target, Sequence[int]]],
               s: Settings) -> list[Row]:
    """The 100-byte GET at every concurrency, each uvicorn reference in turn with the rest
    at its own concurrencies only; ratios against nginx and the direct path of the same
    cell, and ÷base against the router: observability's cost (router+obs), what more
    workers give, and what an earlier commit's router did (`--compare`)."""
    rows: list[Row] = []
    for c in s.concurrency:
        measured = [*targets, *(floor for floor, cs in floors if c in cs)]
        cell = {t.name: measure(t, "/", "GET 100 B", c, s, s.duration) for t in measured}
        for row in cell.values():
            if row.target not in (NGINX, DIRECT):
                row.vs_nginx = _ratio(row.throughput, cell[NGINX].throughput)
            if row.target != DIRECT:
                row.vs_direct = _ratio(row.throughput, cell[DIRECT].throughput)
        for target in targets:
            if target.kind == ROUTER and target.name != ROUTER:
                row = cell[target.name]
                row.vs_base = _ratio(row.throughput, cell[ROUTER].throughput)
        rows.extend(cell.values())
    return rows


def paired(targets: Sequence[Target], s: Settings) -> list[Row]:
    """Each target (the router, then nginx) at c=16 then at c=256, back to back, `--pairs`
    times; each c=256 row's ÷base is against the c=16 row just before. The goals' c=256 ÷
    c=16 ratios are taken from the router's pairs: the table's cells of the two
    concurrencies are minutes apart, and on a shared machine the load of others changes
    in minutes. nginx's pairs, taken between the router's, say what the machine did to
    any proxy in those minutes."""
    rows: list[Row] = []
    for _ in range(s.pairs):
        for target in targets:
            low = measure(target, "/", PAIRED_CELL, 16, s, s.duration)
            high = measure(target, "/", PAIRED_CELL, 256, s, s.duration)
            high.vs_base = _ratio(high.throughput, low.throughput)
            rows += [low, high]
    return rows


def budget_pairs(router: Target, base: Target, s: Settings) -> list[Row]:
    """The router and the base router (`--compare`) back to back at c=64 and c=256,
    `--pairs` times, which one goes first alternating; each router row's ÷base is against
    the base row beside it. The 5% budget is judged on these pairs: one table cell of
    each, minutes apart, took the machine's hiccups for the router's (in one run of
    2026-12-02 the router's c=256 cell read 0.74 of the base's, while the router's own
    c=256 cells of the same run, minutes later, read 1.04 and 1.06 of it)."""
    rows: list[Row] = []
    for index in range(s.pairs):
        for c in (64, 256):
            order = (base, router) if index % 2 == 0 else (router, base)
            measured = [measure(target, "/", BUDGET_CELL, c, s, s.duration) for target in order]
            mine, theirs = measured if order[0] is router else measured[::-1]
            mine.vs_base = _ratio(mine.throughput, theirs.throughput)
            rows += measured
    return rows


def _transfer_once(target: Target, direction: str, big: Path) -> tuple[float | None, Usage]:
    """MiB/s of one transfer (None if it failed), and what it cost the target."""
    speed = None
    with Usage(target.pid) as usage:
        try:
            if direction == "download":
                speed = transfer.download(target.url + "/big", nginx.BIG_SIZE)
            else:
                speed = transfer.upload(target.url + "/upload", big)
        except RuntimeError as exc:
            print(f"  {target.name} {direction}: {exc}", file=sys.stderr)
    return speed, usage


def transfers(targets: Sequence[Target], relays: Sequence[Target], big: Path,
              reps: int) -> list[Row]:
    """64 MiB each way; each repetition goes round every target in turn, so drift of the
    machine hits them alike. The median rate is reported, the CPU summed over the
    repetitions, and the peak RSS over all of them. The router's ÷base is against the
    uvloop byte relay (`relays[0]`), the least a uvloop proxy can do."""
    everyone = (*targets, *relays)
    rows: list[Row] = []
    for direction in ("download", "upload"):
        name = f"{'GET' if direction == 'download' else 'POST'} 64 MiB"
        cell = {t.name: Row(cell=name, target=t.name, connections=1, throughput=0.0,
                            unit="MiB/s", cpu_seconds=0.0 if t.pid else None,
                            peak_rss_mib=0.0 if t.pid else None) for t in everyone}
        speeds: dict[str, list[float]] = {t.name: [] for t in everyone}
        for _ in range(reps):
            for t in everyone:
                speed, usage = _transfer_once(t, direction, big)
                row = cell[t.name]
                if speed is None:
                    row.errors += 1
                else:
                    speeds[t.name].append(speed)
                if row.cpu_seconds is not None and row.peak_rss_mib is not None:
                    row.cpu_seconds += usage.cpu_seconds
                    row.peak_rss_mib = max(row.peak_rss_mib, usage.peak_rss_mib)
        for row in cell.values():
            row.throughput = statistics.median(speeds[row.target]) if speeds[row.target] else 0
            print(f"  {name} {row.target}: {row.throughput:,.0f} MiB/s", file=sys.stderr,
                  flush=True)
            if row.target not in (NGINX, DIRECT):
                row.vs_nginx = _ratio(row.throughput, cell[NGINX].throughput)
            if row.target != DIRECT:
                row.vs_direct = _ratio(row.throughput, cell[DIRECT].throughput)
        cell[ROUTER].vs_base = _ratio(cell[ROUTER].throughput, cell[relays[0].name].throughput)
        rows.extend(cell.values())
    return rows


def degraded_pool(cell: str, plain: Sequence[Target], degraded: Sequence[Target],
                  s: Settings) -> list[Row]:
    """A fourth pod that answers every request 503 (busy), or refuses every connection
    (dead): each proxy on that pool against itself on the pool without it, measured just
    before. nginx runs twice: with passive health (`max_fails=1 fail_timeout=10s`, its
    default, which benches the pod for 10 s after one failure, a 503 included), and with
    `max_fails=0`, which tries it every round. The router (its own passive health: the
    pod goes last for a short, doubling cooldown, router/health.py) is compared with the
    first; it runs with metrics and access log on (router+obs, on both pools), so its own
    counters tell how many pod attempts a request cost."""
    c = s.busy_connections
    base = {t.kind: measure(t, "/", cell, c, s, s.degraded_duration) for t in plain}
    rows = list(base.values())
    first: dict[str, Row] = {}
    for target in degraded:
        row = measure(target, "/", cell, c, s, s.degraded_duration)
        row.vs_base = _ratio(row.throughput, base[target.kind].throughput)
        first.setdefault(target.kind, row)
        rows.append(row)
    base[ROUTER].vs_nginx = _ratio(base[ROUTER].throughput, base[NGINX].throughput)
    first[ROUTER].vs_nginx = _ratio(first[ROUTER].throughput, first[NGINX].throughput)
    return rows


def _find(rows: Sequence[Row], cell: str, target: str, c: int | None = None) -> Row | None:
    for row in rows:
        if row.cell == cell and row.target == target and (c is None or row.connections == c):
            return row
    return None


def _pairs(rows: Sequence[Row], target: str) -> list[tuple[Row, Row]]:
    """A target's back-to-back c=16 and c=256 rows (`paired`)."""
    lows = [r for r in rows if r.cell == PAIRED_CELL and r.target == target
            and r.connections == 16]
    highs = [r for r in rows if r.cell == PAIRED_CELL and r.target == target
             and r.connections == 256]
    return list(zip(lows, highs, strict=True))


def _listed(values: Sequence[float]) -> str:
    return ", ".join(f"{value:.2f}" for value in values)


def _of_nginx(pairs: Sequence[tuple[Row, Row]], of: Callable[[Row], float | None]) -> str:
    """nginx's c=256 ÷ c=16, as "; nginx: 0.97, 1.01", or nothing."""
    ratios = [b / a for a, b in ((of(low), of(high)) for low, high in pairs) if a and b]
    return f"; nginx: {_listed(ratios)}" if ratios else ""


def checks(rows: Sequence[Row], base: str | None = None) -> list[Check]:
    """The targets the router is held to, each from this run's own numbers. `base`:
    the row name of an earlier commit's router (`--compare`), held to the 5% budget."""
    found: list[Check] = []
    r64, r16, r256 = (_find(rows, "GET 100 B", ROUTER, c) for c in (64, 16, 256))
    n64, n256 = (_find(rows, "GET 100 B", NGINX, c) for c in (64, 256))
    if r64 and r64.vs_nginx is not None:
        found.append(Check("router ÷ nginx req/s, c=64", r64.vs_nginx, ">= 0.25",
                           r64.vs_nginx >= 0.25))
    pairs, nginx_pairs = (_pairs(rows, target) for target in (ROUTER, NGINX))
    where = f"median of {len(pairs)} back-to-back pairs" if pairs else "the table's cells"
    n16 = _find(rows, "GET 100 B", NGINX, 16)
    if not pairs and r16 and r256:
        pairs = [(r16, r256)]
    if not nginx_pairs and n16 and n256:
        nginx_pairs = [(n16, n256)]
    speed = [high.throughput / low.throughput for low, high in pairs if low.throughput]
    cpu = [high.cpu_us_per_request / low.cpu_us_per_request for low, high in pairs
           if high.cpu_us_per_request and low.cpu_us_per_request]
    # nginx's own ratios, from its pairs between the router's, say what the machine did
    # to any proxy.
    if speed:
        ratio = statistics.median(speed)
        nginx_said = _of_nginx(nginx_pairs, lambda r: r.throughput)
        found.append(Check(f"router req/s c=256 ÷ c=16 ({where}: {_listed(speed)}{nginx_said})",
                           ratio, ">= 0.85", ratio >= 0.85))
    if cpu:
        ratio = statistics.median(cpu)
        nginx_said = _of_nginx(nginx_pairs, lambda r: r.cpu_us_per_request)
        found.append(Check(f"router CPU per request c=256 ÷ c=16 ({where}: {_listed(cpu)}"
                           f"{nginx_said})", ratio, "<= 1.15", ratio <= 1.15))
    for r, n, c, goal in ((r64, n64, 64, 10.0), (r256, n256, 256, 3.0)):
        if r and n and r.p99_ms is not None and n.p99_ms:
            ratio = r.p99_ms / n.p99_ms
            found.append(Check(f"router p99 ÷ nginx p99, c={c}", ratio, f"<= {goal:g}",
                               ratio <= goal))
    for c in (64, 256):
        budget = [r.vs_base for r in rows if r.cell == BUDGET_CELL and r.target == ROUTER
                  and r.connections == c and r.vs_base is not None]
        r = _find(rows, "GET 100 B", ROUTER, c)
        b = _find(rows, "GET 100 B", base, c) if base is not None else None
        if budget and base is not None:
            ratio = statistics.median(budget)
            found.append(Check(f"router ÷ {base} req/s, c={c} (the 5% budget; median of "
                               f"{len(budget)} back-to-back pairs: {_listed(budget)})", ratio,
                               ">= 0.95", ratio >= 0.95))
        elif r and b and b.throughput:
            ratio = r.throughput / b.throughput
            found.append(Check(f"router ÷ {b.target} req/s, c={c} (the 5% budget)", ratio,
                               ">= 0.95", ratio >= 0.95))
    routers = [r for r in rows if r.target.startswith(ROUTER)]
    conns = [r.upstream_conns_per_1k for r in routers if r.upstream_conns_per_1k is not None]
    if conns:
        found.append(Check("router new upstream conns / 1k req, worst cell", max(conns),
                           "<= 1", max(conns) <= 1))
    for cell in ("GET 64 MiB", "POST 64 MiB"):
        row = _find(rows, cell, ROUTER)
        if row and row.vs_nginx is not None:
            found.append(Check(f"router ÷ nginx MiB/s, {cell}", row.vs_nginx, ">= 2",
                               row.vs_nginx >= 2))
    rss = [r.peak_rss_mib for r in routers if r.peak_rss_mib is not None]
    if rss:
        found.append(Check("router peak RSS MiB, all cells", max(rss), "< 150", max(rss) < 150))
    for cell, name in ((BUSY_CELL, "busy pool"), (DEAD_CELL, "dead pod")):
        row = next((r for r in routers if r.cell == cell and r.vs_base is not None), None)
        if row and row.vs_base is not None:
            found.append(Check(f"{name}: errors the client saw", row.non_2xx + row.errors,
                               "== 0", row.non_2xx + row.errors == 0))
            found.append(Check(f"{name}: router req/s ÷ pool without it", row.vs_base,
                               ">= 0.95", row.vs_base >= 0.95))
    return found


def _version(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True)
    return (done.stdout + done.stderr).strip().splitlines()[0]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10,
                        help="seconds per cell of the small GET (the goals' cells)")
    parser.add_argument("--pairs", type=int, default=2,
                        help="after the small GET, the router at c=16 then c=256 this many "
                             "times, back to back: the goals' c=256 ÷ c=16 ratios (0: from "
                             "the table's cells)")
    parser.add_argument("--degraded-duration", type=int, default=5,
                        help="seconds per cell of the busy-pool and dead-pod parts")
    parser.add_argument("--workers", type=int, default=2,
                        help="also measure the router with --workers N on the small GET "
                             "(0 or 1: not)")
    parser.add_argument("--compare", default="", metavar="COMMIT|DIR",
                        help="also measure the router of this git commit (its router/ "
                             "extracted into the run's temp directory) or source tree, on "
                             "the small GET, against this one: the cost of what changed since")
    parser.add_argument("--warmup", type=int, default=2,
                        help="uncounted seconds before each wrk cell (0 = none)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 s cells, 1 s warm-ups, one transfer each")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (at most c)")
    parser.add_argument("--concurrency", default="1,16,64,256",
                        help="comma-separated connection counts for the small GET")
    parser.add_argument("--busy-connections", type=int, default=64,
                        help="connections for the busy-pool and dead-pod cells")
    parser.add_argument("--only", default=",".join(PARTS),
                        help=f"comma-separated parts to run, of {', '.join(PARTS)} (busy and "
                             "dead: the pool with an always-503 or a refusing fourth pod)")
    parser.add_argument("--reps", type=int, default=5, help="64 MiB transfers per target")
    parser.add_argument("--profile", type=Path, metavar="PATH",
                        help="after the table, profile the router with py-spy at c=64 "
                             "(.txt: collapsed stacks, else SVG flame graph)")
    return parser.parse_args(argv)


def _parts(only: str) -> tuple[str, ...]:
    parts = tuple(part.strip() for part in only.split(",") if part.strip())
    unknown = set(parts) - set(PARTS)
    if unknown or not parts:
        raise SystemExit(f"--only: expected some of {', '.join(PARTS)}, got {only!r}")
    return parts


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through every `with`, stopping the children


class Lab:
    """Starts the pods and the proxies in one temp directory, each registered with one
    `ExitStack` so every process stops (by its PID) however the run ends."""

    def __init__(self, stack: ExitStack, workdir: Path) -> None:
        self._stack = stack
        self._workdir = workdir
        self._started = itertools.count()
        self.big = nginx.make_big_file(workdir / "big.bin")
        hosts = [f"127.0.0.{i}" for i in range(2, 7)]
        port = free_port(hosts)
        self.pods = tuple(Pod(f"pod-{i}", host, port) for i, host in enumerate(hosts[:3]))
        self.busy_pods = (*self.pods, Pod("pod-3", hosts[3], port, busy=True))
        # Nothing is started on 127.0.0.6: connections there are refused.
        self.dead_pods = (*self.pods, Pod("pod-3", hosts[4], port, dead=True))
        for pod in self.busy_pods:
            stack.enter_context(nginx.start_pod(pod, workdir, self.big))

    def nginx(self, name: str, pool: tuple[Pod, ...], max_fails: int | None = None,
              fail_timeout: str | None = None) -> Target:
        port = free_port()
        directory = f"nginx-{next(self._started)}"
        child = self._stack.enter_context(
            nginx.start_proxy(directory, self._workdir, pool, port, max_fails, fail_timeout))
        return Target(name, NGINX, f"http://127.0.0.1:{port}", child.pid, pool)

    def router(self, name: str, pool: tuple[Pod, ...], observability: bool = False,
               extra: Sequence[str] = (), source: Path | None = None,
               ) -> tuple[Target, RouterProcess]:
        directory = f"router-{next(self._started)}"
        child = self._stack.enter_context(
            RouterProcess(directory, self._workdir, pool, observability, extra, source))
        return Target(name, ROUTER, child.url, child.pid, pool), child

    def source(self, compare: str) -> Path:
        return source_tree(compare, self._workdir)

    def floor(self, name: str, kind: str, forwards: bool) -> Target:
        """A uvicorn reference (bench/floor.py); the proxies forward to the plain pool."""
        pool = self.pods if forwards else ()
        child = self._stack.enter_context(FloorProcess(name, kind, self._workdir, pool))
        return Target(name, FLOOR, child.url, child.pid, pool)


def run(s: Settings, profile: Path | None) -> tuple[list[Row], bool, list[Check]]:
    """Every cell, in order; also whether router+obs served its metrics, and the router's
    pod attempts beyond the first per 1,000 requests on the degraded pools (from its own
    metrics, warm-up included; without passive health a fourth bad pod costs 250)."""
    with tempfile.TemporaryDirectory(prefix="warmpool-bench-") as tmp, ExitStack() as stack:
        lab = Lab(stack, Path(tmp))
        direct = Target(DIRECT, DIRECT, lab.pods[0].url, None, ())
        proxy = lab.nginx(NGINX, lab.pods)
        router, _ = lab.router(ROUTER, lab.pods)
        observed, observed_process = lab.router(ROUTER_OBS, lab.pods, observability=True)
        rows: list[Row] = []
        wasted: list[Check] = []
        if "small" in s.parts:
            floors = [(lab.floor(name, kind, forwards), cs)
                      for name, kind, forwards, cs in FLOORS]
            more = []
            if s.workers > 1:
                more.append(lab.router(workers_name(s.workers), lab.pods,
                                       extra=("--workers", str(s.workers)))[0])
            base = None
            if s.compare:
                base = lab.router(base_name(s.compare), lab.pods,
                                  source=lab.source(s.compare))[0]
                more.append(base)
            collections, requests = observed_process.collections()
            rows += small_gets([direct, proxy, router, observed, *more], floors, s)
            after = observed_process.collections()
            per_1k = (after[0] - collections) * 1000 / max(after[1] - requests, 1)
            wasted.append(Check(f"{ROUTER_OBS}: young garbage collections / 1k requests, its "
                                "small-GET cells (Python's default threshold: ~35 at c=256)",
                                per_1k, "<= 1", per_1k <= 1))
            if 16 in s.concurrency and 256 in s.concurrency:
                rows += paired([router, proxy], s)
            if base is not None:
                rows += budget_pairs(router, base, s)
        if "transfers" in s.parts:
            relays = [lab.floor(name, kind, forwards=True) for name, kind in RELAY_FLOORS]
            rows += transfers([direct, proxy, router], relays, lab.big, s.reps)
        for part, pool, cell in (("busy", lab.busy_pods, BUSY_CELL),
                                 ("dead", lab.dead_pods, DEAD_CELL)):
            if part in s.parts:
                # With metrics on, to count its attempts; against router+obs on the 3 pods.
                target, process = lab.router(f"router+obs, +{part} pod", pool, True)
                degraded = [
                    target,
                    lab.nginx(f"nginx max_fails=1 fail_timeout=10s, +{part} pod", pool,
                              max_fails=1, fail_timeout="10s"),
                    lab.nginx(f"nginx max_fails=0, +{part} pod", pool, max_fails=0),
                ]
                attempts, requests = process.attempts()
                rows += degraded_pool(cell, [observed, proxy], degraded, s)
                after = process.attempts()
                extra = (after[0] - attempts - (after[1] - requests)) * 1000
                per_1k = extra / max(after[1] - requests, 1)
                wasted.append(Check(f"{part} pod: router's extra pod attempts / 1k requests",
                                    per_1k, "<= 50", per_1k <= 50))
        metrics_served = observed_process.metrics_served()
        if profile is not None and router.pid is not None:
            pyspy.record(router.pid, router.url + "/", 64, max(s.duration, 5), profile)
    return rows, metrics_served, wasted


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    s = Settings(
        duration=2 if args.quick else max(1, args.duration),
        degraded_duration=2 if args.quick else max(1, args.degraded_duration),
        workers=args.workers,
        pairs=1 if args.quick else max(0, args.pairs),
        compare=args.compare,
        warmup=1 if args.quick else args.warmup,
        threads=args.threads,
        concurrency=tuple(int(c) for c in args.concurrency.split(",")),
        busy_connections=args.busy_connections,
        reps=1 if args.quick else args.reps,
        parts=_parts(args.only),
    )
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    started = datetime.datetime.now(datetime.UTC)
    speed_before = host.loop_us()
    rows, metrics_served, wasted = run(s, args.profile)
    speed_after = host.loop_us()
    found = checks(rows, base_name(s.compare) if s.compare else None) + wasted
    meta = {
        "started": started.isoformat(timespec="seconds"),
        "settings": s.__dict__,
        "cpus": psutil.cpu_count(),
        "cpu_model": host.cpu_model(),
        "loop_us_before": round(speed_before, 2),
        "loop_us_after": round(speed_after, 2),
        "python": platform.python_version(),
        "nginx": _version(["nginx", "-v"]),
        "wrk": _version(["wrk", "-v"]),
        "git": _version(["git", "rev-parse", "HEAD"]),
        "router_obs_metrics_served": metrics_served,
    }
    out = RESULTS / f"{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    report.write_json(out, meta, rows, found)
    print(report.table(rows))
    print()
    print(f"nginx: one worker (`master_process off`), keepalive 64 to the pods; wrk -t"
          f"{s.threads}, {s.duration:g} s cells ({s.degraded_duration:g} s with a busy or "
          f"dead pod) after {s.warmup:g} s warm-ups; {psutil.cpu_count()} CPUs shared by "
          f"everything ({host.cpu_model()}; `{host.LOOP}` took {speed_before:.1f} µs before "
          f"the run and {speed_after:.1f} µs after it: the machine's speed, to compare runs).")
    print("CPU µs/req: the proxy's CPU time (user + system, its workers included, from "
          "/proc/PID/stat) over the cell ÷ the requests wrk counted; CPU cores: that CPU "
          "time ÷ the cell's seconds (1.00 = one core saturated).")
    print("÷base: router+obs, router --workers N and the base router (an earlier commit, "
          "--compare) ÷ router; a pool with a busy or dead pod ÷ the same proxy without "
          f"that pod. router+obs /metrics served: {'yes' if metrics_served else 'no'}.")
    print("References (GET 100 B; httpx at c=64 only): uvicorn answering 100 B itself is the "
          "ceiling of any uvicorn server here; the bare proxies forward round robin with one "
          "shared aiohttp or httpx client (unbounded pool) and nothing else: the least a "
          "uvicorn-based proxy's hop can cost here.")
    print()
    print(report.checks_text(found))
    print()
    print(f"JSON: {out}")


if __name__ == "__main__":
    main()
