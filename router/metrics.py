"""Prometheus metrics, fed by the proxy through the `Observer` interface and served on
`--metrics-port` by a small threaded server, so a scrape never runs on the event loop.

Labels are bounded on purpose: route, method (unknown methods count as `other`), status
code, outcome and skip reason. No pod or sandbox label: thousands of sandboxes would be
thousands of series. A request costs a few integer increments (measured in bench/: see the README).
"""

from __future__ import annotations

import gc
import math
import operator
import socket
import threading
import urllib.request
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from importlib.metadata import PackageNotFoundError, version
from itertools import accumulate
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler
from wsgiref.types import StartResponse, WSGIApplication

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.parser import text_string_to_metric_families

from router.observe import Cause, Decision, Exchange, Outcome, Refresh, Route
from router.pods import PodSource

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OUTCOMES: tuple[Outcome, ...] = ("ok", "busy", "connect_error", "timeout", "error")
ROUTES: tuple[Route, ...] = ("pool", "pinned")
REFRESHES: tuple[Refresh, ...] = ("ok", "error")
CAUSES: tuple[Cause, ...] = ("busy", "failed")
DECISIONS: tuple[Decision, ...] = ("allow", "deny")
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


def duration_buckets(proxy_timeout: float) -> tuple[float, ...]:
    """The usual latency buckets, cut at the proxy timeout (a request that streams for
    longer, with no wait for the pod as long as that, lands in `+Inf`)."""
    return (*(b for b in _BUCKETS if b < proxy_timeout), proxy_timeout)


def _counter(name: str, documentation: str, label: str,
             counts: Iterable[tuple[str, int]]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=[label])
    for value, count in counts:
        family.add_metric([value], count)
    return family


def _version() -> str:
    try:
        return version("warmpool-router")
    except PackageNotFoundError:
        return "unknown"


class Metrics:
    """Every `warmpool_router_*` metric, in a registry of its own (one per router).

    The request path only bumps plain integers (no lock, no metric object): the event loop
    is their one writer, and a scrape, from the metrics thread, turns them into metric
    families. Copying a dict or a list is one step under the GIL, so a scrape always reads
    a consistent value of each.
    """

    def __init__(self, proxy_timeout: float) -> None:
        self.registry = CollectorRegistry()
        self._bounds = duration_buckets(proxy_timeout)
        self._les = [*(repr(float(bound)) for bound in self._bounds), "+Inf"]
        self._requests: dict[tuple[str, str, int], int] = {}
        self._durations = {route: [0] * (len(self._bounds) + 1) for route in ROUTES}
        self._duration_sums = dict.fromkeys(ROUTES, 0.0)
        self._attempts = dict.fromkeys(OUTCOMES, 0)
        self._refreshes = dict.fromkeys(REFRESHES, 0)
        self._skips = dict.fromkeys(CAUSES, 0)
        self._authz = dict.fromkeys(DECISIONS, 0)
        self._retries = 0
        self._started = 0
        self._finished = 0
        self._upgraded = 0  # tunnels opened; each also finishes, with status 101
        self._source: PodSource | None = None
        self._version = _version()
        self._server: ThreadingWSGIServer | None = None
        self._routes: dict[str, WSGIApplication] = {}
        self.registry.register(self)

    def track(self, source: PodSource) -> None:
        """Report the pool gauges of `source`, read at scrape time."""
        self._source = source

    # The Observer interface, called by the proxy (and by a pod source, from its thread).

    def request_started(self, route: Route) -> None:
        self._started += 1

    def attempt(self, outcome: Outcome) -> None:
        self._attempts[outcome] += 1

    def request_finished(self, exchange: Exchange) -> None:
        self._finished += 1
        if exchange.status == 101:
            self._upgraded -= 1  # counted in `requests` when it opened
        else:
            self._count(exchange)
        self._durations[exchange.route][bisect_left(self._bounds, exchange.duration)] += 1
        self._duration_sums[exchange.route] += exchange.duration
        if exchange.attempts > 1 and exchange.route == "pool":
            self._retries += exchange.attempts - 1
        if exchange.authz is not None:
            self._authz[exchange.authz] += 1

    def upgraded(self, exchange: Exchange) -> None:
        self._upgraded += 1
        self._count(exchange)

    def _count(self, exchange: Exchange) -> None:
        method = exchange.method if exchange.method in METHODS else "other"
        key = (exchange.route, method, exchange.status or 500)
        self._requests[key] = self._requests.get(key, 0) + 1

    def pod_list_refreshed(self, outcome: Refresh) -> None:
        self._refreshes[outcome] += 1

    def pod_skipped(self, cause: Cause) -> None:
        self._skips[cause] += 1

    # The Collector interface, called by a scrape.

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterable[Metric]:
        requests = CounterMetricFamily(
            "warmpool_router_requests", "Proxied requests, by route, method and status code.",
            labels=["route", "method", "code"])
        for (route, method, code), count in self._requests.copy().items():
            requests.add_metric([route, method, str(code)], count)
        yield requests
        duration = HistogramMetricFamily(
            "warmpool_router_request_duration_seconds",
            "Time from request to the end of the response, by route.", labels=["route"])
        for route in ROUTES:
            counts = accumulate(self._durations[route].copy())
            duration.add_metric([route], list(zip(self._les, counts, strict=True)),
                                self._duration_sums[route])
        yield duration
        yield _counter("warmpool_router_upstream_attempts",
                       "Attempts to reach a pod, by outcome.", "outcome",
                       self._attempts.copy().items())
        yield _counter("warmpool_router_pod_skips",
                       "Pool requests that put a cooling-down pod behind the others, by why "
                       "it cools down (busy: it answered 503; failed: refused or failed).",
                       "reason", self._skips.copy().items())
        yield CounterMetricFamily("warmpool_router_retries",
                                  "Pool attempts after the first one of a request.",
                                  value=self._retries)
        yield GaugeMetricFamily("warmpool_router_inflight_requests",
                                "Requests being proxied now.",
                                value=self._started - self._finished)
        yield GaugeMetricFamily("warmpool_router_upgraded_connections",
                                "Upgraded connections (WebSocket) open now.",
                                value=self._upgraded)
        yield GaugeMetricFamily("warmpool_router_pool_pods", "Pods in the current pod list.",
                                value=self._pool_pods())
        yield GaugeMetricFamily(
            "warmpool_router_pod_list_age_seconds",
            "Seconds since the pod list was last confirmed (+Inf before the first sync).",
            value=self._pod_list_age())
        yield _counter("warmpool_router_pod_list_refreshes",
                       "Pod list calls to the Kubernetes API.", "outcome",
                       self._refreshes.copy().items())
        yield _counter("warmpool_router_authz_decisions",
                       "Authorization decisions on proxied requests (none in allow-all mode).",
                       "decision", self._authz.copy().items())
        yield from _collector_families()
        build = GaugeMetricFamily("warmpool_router_build_info", "The running version.",
                                  labels=["version"])
        build.add_metric([self._version], 1)
        yield build

    def _pool_pods(self) -> float:
        snapshot = self._source.snapshot() if self._source is not None else None
        return len(snapshot.pods) if snapshot else 0

    def _pod_list_age(self) -> float:
        age = self._source.age() if self._source is not None else None
        return math.inf if age is None else age

    # Serving.

    @property
    def port(self) -> int | None:
        """The port `/metrics` is served on, or None when not serving."""
        return self._server.server_port if self._server is not None else None

    def serve(self, sock: socket.socket) -> None:
        """Serve `/metrics` on a listening socket, from a thread of its own."""
        self._server = serve_registry(self.registry, sock, self._routes)

    def route(self, routes: Mapping[str, WSGIApplication]) -> None:
        """Answer these paths with their own apps (the probes), before or while serving."""
        self._routes.update(routes)

    def close(self) -> None:
        """Stop serving; blocks up to the server's poll interval (call off the loop)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


# Worker metrics are on loopback: never through a proxy from the environment.
_LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def serve_registry(registry: CollectorRegistry, sock: socket.socket,
                   routes: Mapping[str, WSGIApplication] | None = None) -> ThreadingWSGIServer:
    """A threaded HTTP server answering the paths in `routes` with their apps (read per
    request, so they may be added later) and every other path with `registry`'s metrics."""
    host, port = sock.getsockname()[:2]
    server = ThreadingWSGIServer((host, port), _QuietHandler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    server.server_address = (host, port)
    server.server_name, server.server_port = host, port
    server.setup_environ()
    metrics: WSGIApplication = make_wsgi_app(registry)
    routes = {} if routes is None else routes

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        try:
            return routes.get(environ["PATH_INFO"], metrics)(environ, start_response)
        except Unanswered as exc:
            start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
            return [f"{exc}\n".encode()]

    server.set_app(app)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


def _collector_families() -> Iterable[Metric]:
    """The garbage collector's runs and what they freed, by generation: a request leaves
    no reference cycle (`router/run.py`), so collected objects growing with traffic mean
    one came back, and collections per request are CPU the router spends in pauses."""
    stats = list(enumerate(gc.get_stats()))
    yield _counter("warmpool_router_gc_collections",
                   "Garbage collector runs in this process, by generation.", "generation",
                   [(str(generation), stat["collections"]) for generation, stat in stats])
    yield _counter("warmpool_router_gc_collected_objects",
                   "Objects the garbage collector freed (unreachable reference cycles), by "
                   "generation.", "generation",
                   [(str(generation), stat["collected"]) for generation, stat in stats])


class Unanswered(Exception):
    """A worker did not answer a scrape: the scrape is a 503 naming it, rather than totals
    that drop (a counter going down reads as a reset) or a 500 with a traceback."""


class Gathered:
    """`--workers N`: the workers' metrics as one. Each worker serves its own on a
    loopback port it reports to the supervisor; a scrape of the supervisor reads them all
    and adds them up, except the pod-list gauges, where the worst worker speaks for all
    (the fewest pods, the oldest list), and `build_info`."""

    WORST = {"warmpool_router_pool_pods": min, "warmpool_router_pod_list_age_seconds": max,
             "warmpool_router_build_info": max}

    def __init__(self, ports: Callable[[], list[int]]) -> None:
        self._ports = ports

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        values: dict[tuple[str, str, tuple[tuple[str, str], ...]], float] = {}
        for port in self._ports():
            try:
                with _LOOPBACK.open(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
                    text = page.read().decode()
            except OSError as exc:  # a worker gone (the others stop then) or stuck
                raise Unanswered(f"a worker's metrics (port {port}) did not answer: "
                                 f"{exc}") from None
            for family in text_string_to_metric_families(text):
                families.setdefault(family.name,
                                    Metric(family.name, family.documentation, family.type))
                combine = self.WORST.get(family.name, operator.add)
                for sample in family.samples:
                    key = (family.name, sample.name, tuple(sorted(sample.labels.items())))
                    values[key] = (combine(values[key], sample.value) if key in values
                                   else sample.value)
        for (family_name, name, labels), value in values.items():
            families[family_name].add_sample(name, dict(labels), value)
        return list(families.values())


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return None
