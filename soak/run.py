"""`python -m soak.run`: the fault pods in a process of their own, the real router command
over them, the client in this process; then the verdict.

Everything is on loopback, in a temporary directory; the pods' process and the router are
stopped by their own PIDs whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
from prometheus_client.parser import text_string_to_metric_families

from bench.procs import ServerChild, fetch, free_port
from soak import load, pods
from soak.verdict import Sample, Verdict, judge


@dataclass(frozen=True)
class Options:
    requests: int = 100_000
    concurrency: int = 256
    workers: int = 1
    pods: int = 5
    seed: int = 1
    max_size: int = 5 * load.MiB
    hung_after: float = 120.0


class Router(ServerChild):
    """`python -m router` over the fault pods: keep-alive long enough that the router
    never closes a client connection between two requests (so a client never has to guess
    whether to send again), metrics on, the access log (stdout) kept in `access.log` so
    the verdict can join the router's view to the client's."""

    def __init__(self, workdir: Path, hosts: list[str], port: int, workers: int) -> None:
        self.metrics_port = free_port()
        own_port = free_port()
        argv = [
            sys.executable, "-m", "router", "--host", "127.0.0.1", "--port", str(own_port),
            "--pods", ",".join(f"p{i}={host}:{port}" for i, host in enumerate(hosts)),
            "--metrics-port", str(self.metrics_port), "--workers", str(workers),
            "--timeout-keep-alive", "300", "--access-log", "--log-level", "warning",
        ]
        self.access_log = workdir / "access.log"
        super().__init__("router", argv, workdir / "router.log", own_port, "/ready",
                         stdout=self.access_log)

    def counters(self) -> dict[tuple[str, str], float]:
        """`requests_total` by method and code, over both routes."""
        text = fetch(f"http://127.0.0.1:{self.metrics_port}/metrics")[1].decode()
        counts: dict[tuple[str, str], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "warmpool_router_requests_total":
                    key = (sample.labels["method"], sample.labels["code"])
                    counts[key] = counts.get(key, 0) + sample.value
        return counts


class Sampler:
    """RSS and open descriptors of the router and its workers, every `interval` s."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        self.samples: list[Sample] = []
        self._process = psutil.Process(pid)
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                processes = [self._process, *self._process.children()]
                self.samples.append(Sample(time.monotonic(),
                                           sum(p.memory_info().rss for p in processes),
                                           sum(p.num_fds() for p in processes)))
            except psutil.Error:  # a worker between two reads
                continue

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def soak(options: Options, workdir: Path) -> Verdict:
    hosts = [f"127.0.0.{2 + index}" for index in range(options.pods)]
    port = free_port(hosts)
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    fleet = context.Process(target=pods.main, args=(hosts, port, options.seed, theirs),
                            name="soak-pods", daemon=True)
    fleet.start()
    try:
        if not ours.poll(30) or ours.recv() != "listening":
            raise RuntimeError("the soak's pods did not start")
        data = pods.block(options.seed)
        planned = load.plan(options.requests, options.seed, options.max_size, len(data))
        with Router(workdir, hosts, port, options.workers) as router:
            with Sampler(router.pid) as sampler:
                results = asyncio.run(load.run(router.url, planned, options.concurrency,
                                               data, options.hung_after))
            counters = settled_counters(router, results)
        ours.send("stop")
        if not ours.poll(30):
            raise RuntimeError("the soak's pods did not report")
        log: pods.Log = ours.recv()
    finally:
        fleet.join(5)
        if fleet.is_alive():
            fleet.kill()
            fleet.join()
    return judge(planned, results, log, sampler.samples, counters,
                 router.log.read_text(), router.access_log.read_text())


def settled_counters(router: Router, results: list[load.Result],
                     timeout: float = 10.0) -> dict[tuple[str, str], float]:
    """The router counts a request when it ends, a moment after the client has its last
    byte: read until the totals agree, or until `timeout` and report what they say."""
    answered = sum(1 for result in results if result.status)
    deadline = time.monotonic() + timeout
    while True:
        counters = router.counters()
        if sum(counters.values()) >= answered or time.monotonic() > deadline:
            return counters
        time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m soak.run", description=__doc__)
    defaults = Options()
    parser.add_argument("--requests", type=int, default=defaults.requests)
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="one run per value (default: 1 and 2)")
    parser.add_argument("--pods", type=int, default=defaults.pods)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--max-size", type=int, default=defaults.max_size,
                        help="largest body either way, bytes")
    args = parser.parse_args(argv)
    ok = True
    for workers in args.workers:
        options = Options(args.requests, args.concurrency, workers, args.pods, args.seed,
                          args.max_size)
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="soak-") as workdir:
            verdict = soak(options, Path(workdir))
        print(f"== --workers {workers}: {options.requests} requests at c={options.concurrency}"
              f" over {options.pods} pods in {time.monotonic() - started:.0f} s")
        print(verdict.report(), flush=True)
        ok = ok and verdict.ok
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
