"""Prometheus metrics, fed by the proxy through the `Observer` interface and served on
`--metrics-port` by a small threaded server, so a scrape never runs on the event loop.

Labels are bounded on purpose: route, method (unknown methods count as `other`), status
code and outcome. No pod or sandbox label: thousands of sandboxes would be thousands of
series. Label children are looked up once and kept, so a request costs a few increments.
"""

from __future__ import annotations

import math
import socket
import threading
from importlib.metadata import PackageNotFoundError, version
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from router.observe import Exchange, Outcome, Refresh, Route
from router.pods import PodSource

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OUTCOMES: tuple[Outcome, ...] = ("ok", "busy", "connect_error", "timeout", "error")
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


def duration_buckets(proxy_timeout: float) -> tuple[float, ...]:
    """The usual latency buckets, cut at the proxy timeout, which no request outlives."""
    return (*(b for b in _BUCKETS if b < proxy_timeout), proxy_timeout)


def _version() -> str:
    try:
        return version("warmpool-router")
    except PackageNotFoundError:
        return "unknown"


class Metrics:
    """Every `warmpool_router_*` metric, in a registry of its own (one per router)."""

    def __init__(self, proxy_timeout: float) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self._requests = Counter(
            "warmpool_router_requests", "Proxied requests, by route, method and status code.",
            ["route", "method", "code"], registry=registry,
        )
        self._duration = Histogram(
            "warmpool_router_request_duration_seconds",
            "Time from request to the end of the response, by route.",
            ["route"], buckets=duration_buckets(proxy_timeout), registry=registry,
        )
        attempts = Counter(
            "warmpool_router_upstream_attempts", "Attempts to reach a pod, by outcome.",
            ["outcome"], registry=registry,
        )
        self._attempts = {outcome: attempts.labels(outcome) for outcome in OUTCOMES}
        self._retries = Counter(
            "warmpool_router_retries", "Pool attempts after the first one of a request.",
            registry=registry,
        )
        self._inflight = Gauge(
            "warmpool_router_inflight_requests", "Requests being proxied now.", registry=registry
        )
        self._pods = Gauge(
            "warmpool_router_pool_pods", "Pods in the current pod list.", registry=registry
        )
        self._age = Gauge(
            "warmpool_router_pod_list_age_seconds",
            "Seconds since the pod list was last confirmed (+Inf before the first sync).",
            registry=registry,
        )
        refreshes = Counter(
            "warmpool_router_pod_list_refreshes", "Pod list calls to the Kubernetes API.",
            ["outcome"], registry=registry,
        )
        self._refreshes = {outcome: refreshes.labels(outcome) for outcome in ("ok", "error")}
        build = Gauge("warmpool_router_build_info", "The running version.", ["version"],
                      registry=registry)
        build.labels(_version()).set(1)
        self._routes = {route: self._duration.labels(route) for route in ("pool", "pinned")}
        self._server: ThreadingWSGIServer | None = None
        self._children: dict[tuple[str, str, int], Any] = {}

    def track(self, source: PodSource) -> None:
        """Read the pool gauges from `source` at scrape time."""

        def pods() -> float:
            snapshot = source.snapshot()
            return len(snapshot.pods) if snapshot else 0

        def age() -> float:
            seconds = source.age()
            return math.inf if seconds is None else seconds

        self._pods.set_function(pods)
        self._age.set_function(age)

    # The Observer interface, called by the proxy and the pod source.

    def request_started(self, route: Route) -> None:
        self._inflight.inc()

    def attempt(self, outcome: Outcome) -> None:
        self._attempts[outcome].inc()

    def request_finished(self, exchange: Exchange) -> None:
        self._inflight.dec()
        method = exchange.method if exchange.method in METHODS else "other"
        key = (exchange.route, method, exchange.status or 500)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._requests.labels(*key[:2], str(key[2]))
        child.inc()
        self._routes[exchange.route].observe(exchange.duration)
        if exchange.attempts > 1 and exchange.route == "pool":
            self._retries.inc(exchange.attempts - 1)

    def pod_list_refreshed(self, outcome: Refresh) -> None:
        self._refreshes[outcome].inc()

    # Serving.

    @property
    def port(self) -> int | None:
        """The port `/metrics` is served on, or None when not serving."""
        return self._server.server_port if self._server is not None else None

    def serve(self, sock: socket.socket) -> None:
        """Serve `/metrics` on a listening socket, from a thread of its own."""
        host, port = sock.getsockname()[:2]
        server = ThreadingWSGIServer((host, port), _QuietHandler, bind_and_activate=False)
        server.socket.close()
        server.socket = sock
        server.server_address = (host, port)
        server.server_name, server.server_port = host, port
        server.setup_environ()
        server.set_app(make_wsgi_app(self.registry))
        threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
        self._server = server

    def close(self) -> None:
        """Stop serving; blocks up to the server's poll interval (call off the loop)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return None
