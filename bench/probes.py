"""`python -m bench.probes`: how `/ready` and `/healthz` answer while the router is
overloaded, on the main port (answered on the serving event loop) and on the metrics port
(answered by the admin listener's own thread).

A probe-like client asks each endpoint on a fixed period as the kubelet does (a new
connection per probe, `Connection: close`, the next one on the next tick, ticks missed
while a probe runs are dropped) and records every latency and status, waiting up to
`CAP` seconds so that slow answers are measured rather than cut. The router is the real
command over three nginx pods on 127.0.0.2-4; the overloads are wrk at c=256 on the 100 B
answer, bursts of 2,000 new connections, 200 slow 1 MiB uploads (bench/flood.py), and
wrk at c=256 against `--limit-concurrency 64`.

For each endpoint: p50/p99/max, then what the kubelet would have concluded: failed
probes (slower than the timeout, or not 200) and removals (failureThreshold failures in
a row) under the old settings (timeout 1 s, threshold 1) and the new ones (`NEW`, as in
k8s/deployment.yaml). Sampling faster than the kubelet's 2 s period makes the run short;
it also makes "N failures in a row" span less time than it would, so the removals
counted are, if anything, too many.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench import nginx, wrk
from bench.nginx import Pod
from bench.procs import Child, free_port
from bench.router import RouterProcess

CAP = 10.0  # seconds a probe waits here before it counts as no answer at all
LIMIT = 64  # --limit-concurrency of the router in the last scenario
PATHS = ("/ready", "/healthz")


@dataclass(frozen=True)
class Settings:
    """A probe's `timeoutSeconds` and `failureThreshold`."""

    timeout: float
    threshold: int

    def failed(self, sample: Sample) -> bool:
        return sample.status != 200 or sample.seconds > self.timeout

    def removals(self, samples: Sequence[Sample]) -> int:
        """Times the kubelet would have acted: `threshold` failures in a row."""
        count = run = 0
        for sample in samples:
            run = run + 1 if self.failed(sample) else 0
            if run == self.threshold:
                count += 1
        return count


OLD = Settings(timeout=1.0, threshold=1)
NEW = Settings(timeout=2.0, threshold=3)  # the readiness probe of k8s/deployment.yaml


@dataclass(frozen=True)
class Sample:
    seconds: float
    status: int | None  # None: no answer within CAP, or the connection failed
    heartbeat_age: float | None  # what the admin /healthz reports, when it does


def probe(port: int, path: str) -> Sample:
    """One kubelet-like HTTP GET on a new connection."""
    started = time.monotonic()
    status: int | None = None
    answer = b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=CAP) as sock:
            sock.settimeout(max(0.001, CAP - (time.monotonic() - started)))
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                         "User-Agent: kube-probe/1.30\r\nAccept: */*\r\n"
                         "Connection: close\r\n\r\n".encode())
            while chunk := sock.recv(65536):
                answer += chunk
        status = int(answer.split(b" ", 2)[1])
    except (OSError, ValueError, IndexError):
        pass
    return Sample(time.monotonic() - started, status, _heartbeat_age(answer))


def _heartbeat_age(answer: bytes) -> float | None:
    try:
        body = json.loads(answer.partition(b"\r\n\r\n")[2])
    except ValueError:
        return None
    age = body.get("heartbeat_age") if isinstance(body, dict) else None
    return float(age) if isinstance(age, int | float) else None


class Prober:
    """One thread per endpoint, probing every `period` seconds until stopped."""

    def __init__(self, port: int, path: str, period: float) -> None:
        self.port, self.path, self.period = port, path, period
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        tick = time.monotonic()
        while not self._stop.is_set():
            self.samples.append(probe(self.port, self.path))
            tick += self.period
            now = time.monotonic()
            if tick < now:  # the probe outlasted its period: that tick is dropped
                tick = now
            self._stop.wait(tick - now)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(CAP + 1)


@dataclass(frozen=True)
class Row:
    scenario: str
    endpoint: str
    samples: Sequence[Sample]

    def cells(self) -> list[str]:
        times = sorted(sample.seconds * 1000 for sample in self.samples)
        p99 = (statistics.quantiles(times, n=100, method="inclusive")[98] if len(times) > 1
               else times[0])
        ages = [s.heartbeat_age for s in self.samples if s.heartbeat_age is not None]
        return [
            self.scenario, self.endpoint, str(len(times)),
            f"{statistics.median(times):.1f}", f"{p99:.1f}", f"{times[-1]:.1f}",
            *(f"{sum(settings.failed(s) for s in self.samples)} / "
              f"{settings.removals(self.samples)}" for settings in (OLD, NEW)),
            f"{max(ages):.2f}" if ages else "—",
        ]


HEADER = ["scenario", "endpoint", "probes", "p50 ms", "p99 ms", "max ms",
          "old: failed / removals", "new: failed / removals", "max heartbeat age s"]


def table(rows: Sequence[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines)


Overload = Callable[[RouterProcess, float], AbstractContextManager[None]]


@contextmanager
def idle(router: RouterProcess, seconds: float) -> Iterator[None]:
    yield


@contextmanager
def small_gets(router: RouterProcess, seconds: float) -> Iterator[None]:
    with wrk.Load(router.url + "/", 256, int(seconds) + 2):
        yield


def _flood(kind: str) -> Overload:
    @contextmanager
    def run(router: RouterProcess, seconds: float) -> Iterator[None]:
        argv = [sys.executable, "-m", "bench.flood", kind, "127.0.0.1", str(router.port),
                str(seconds + 2)]
        with Child(f"flood-{kind}", argv, router.log.with_name(f"flood-{kind}.log")):
            yield

    return run


SCENARIOS: tuple[tuple[str, Overload, bool], ...] = (
    # (name, overload, whether the router runs with --limit-concurrency LIMIT)
    ("idle", idle, False),
    ("wrk c=256 GET 100 B", small_gets, False),
    ("bursts of 2,000 new connections", _flood("burst"), False),
    ("200 slow 1 MiB uploads", _flood("uploads"), False),
    (f"wrk c=256, --limit-concurrency {LIMIT}", small_gets, True),
)


def run(seconds: float, period: float, ramp: float) -> list[Row]:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="warmpool-probes-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        small = workdir / "big.bin"
        small.write_bytes(b"x")
        hosts = [f"127.0.0.{i}" for i in range(2, 5)]
        port = free_port(hosts)
        pods = [Pod(f"pod-{i}", host, port) for i, host in enumerate(hosts)]
        for pod in pods:
            stack.enter_context(nginx.start_pod(pod, workdir, small))
        routers: dict[bool, RouterProcess] = {}
        for limited in (False, True):
            extra = ["--limit-concurrency", str(LIMIT)] if limited else []
            routers[limited] = stack.enter_context(RouterProcess(
                f"router-{'limited' if limited else 'plain'}", workdir, pods,
                observability=True, extra=extra))
        for name, overload, limited in SCENARIOS:
            router = routers[limited]
            endpoints = [(f"{where} {path}", port, path)
                         for where, port in (("traffic", router.port),
                                             ("metrics", router.metrics_port))
                         for path in PATHS]
            with overload(router, seconds + ramp):
                time.sleep(ramp)  # the overload builds up before probing starts
                with ExitStack() as probing:
                    probers = [(label, probing.enter_context(Prober(port, path, period)))
                               for label, port, path in endpoints]
                    time.sleep(seconds)
            rows += [Row(name, label, prober.samples) for label, prober in probers]
            print(f"  {name}: done", file=sys.stderr, flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.probes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20, help="probing per scenario")
    parser.add_argument("--period", type=float, default=0.5,
                        help="seconds between probes of one endpoint (the kubelet: 2)")
    parser.add_argument("--ramp", type=float, default=2,
                        help="seconds of overload before probing starts")
    args = parser.parse_args(argv)
    rows = run(args.seconds, args.period, args.ramp)
    print(table(rows))
    print()
    print(f"Probes every {args.period:g} s per endpoint for {args.seconds:g} s per scenario, "
          f"each waiting up to {CAP:g} s. Old: timeout {OLD.timeout:g} s, failureThreshold "
          f"{OLD.threshold}; new: timeout {NEW.timeout:g} s, failureThreshold {NEW.threshold}.")


if __name__ == "__main__":
    main()
