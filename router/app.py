"""The ASGI application: probes, the proxy for everything else, and the lifespan that
creates (and closes) the upstream client and the pod source.

A lean entry rather than a starlette `Router`: every proxied request would otherwise pay
for route matching it never needs; three exact paths are a dict lookup.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
from collections.abc import Awaitable, Callable

from router import probes, upstream
from router.asgi import Receive, Scope, Send
from router.authz import (
    Authorizer,
    BearerTokens,
    Gate,
    ScopedTokens,
    is_loopback,
    pool_name,
    read_secret,
)
from router.balancer import FirstIndex
from router.config import Config, ConfigError
from router.errors import send_json
from router.health import Clock
from router.logs import AccessLog
from router.metrics import Metrics
from router.observe import Observer, combine
from router.pods import Pod, PodSource, StaticPodSource
from router.proxy import Proxy
from router.resolver import Lookup, system_lookup
from router.server import bind
from router.targets import TargetPolicy

log = logging.getLogger("router.app")

Probe = Callable[[Send], Awaitable[None]]


def build_source(config: Config, observer: Observer) -> PodSource:
    """The pool the router serves: `--demo`, `--pods`, else the Kubernetes API."""
    if config.demo:
        from router.demo import DemoPool

        return DemoPool(config.demo, config.namespace)
    if config.pods:
        return StaticPodSource(
            Pod(p.name, config.namespace, p.host, p.port) for p in config.pods
        )
    from router.sandboxes import KubernetesPodSource

    return KubernetesPodSource(config, observer)


def build_authorizer(config: Config) -> Authorizer | None:
    """The `--authz-mode` authorizer (None: allow-all). Blocking (reads files, and for
    tokenreview the kubeconfig): called in a thread at start-up."""
    if config.authz_mode == "allow-all":
        if not is_loopback(config.host):
            log.warning("--authz-mode allow-all on %s: whoever reaches this address can use "
                        "every sandbox, and the sandbox sees their Authorization header",
                        config.host)
        return None
    if config.authz_mode == "bearer":
        assert config.authz_bearer_token_file is not None  # config.validate
        return BearerTokens(config.authz_bearer_token_file)
    if config.authz_mode == "scoped-token":
        assert config.authz_scoped_token_secret_file is not None  # config.validate
        return ScopedTokens(read_secret(config.authz_scoped_token_secret_file))
    from router.tokenreview import TokenReviewer, kube_review

    if not config.authz_tokenreview_audiences:
        log.warning("--authz-mode tokenreview without --authz-tokenreview-audiences: any "
                    "token the API server accepts is let in, the ServiceAccount token of "
                    "every pod (a sandbox's included)")
    review, close = kube_review(config)
    return TokenReviewer(review, config.authz_tokenreview_ttl, close)


class Router:
    """`GET /healthz`, `GET /ready` (`/readyz`) answered here; everything else proxied.

    Metrics (`--metrics-port`) and the access log (`--access-log`) are built from the
    config; `metrics` may be passed in already serving (tests bind it to a free port),
    `observer` adds one more subscriber, `clock` times the pods' cooldowns (tests
    move it by hand), and `first` picks where the round robin starts (tests: the first
    pod; router/balancer.py). The metrics listener answers the probes too, from its own
    thread (`router/probes.py`), for Kubernetes.
    """

    def __init__(
        self,
        config: Config,
        source: PodSource | None = None,
        observer: Observer | None = None,
        lookup: Lookup = system_lookup,
        metrics: Metrics | None = None,
        clock: Clock = time.monotonic,
        first: FirstIndex = random.randrange,
    ) -> None:
        self.config = config
        self._lookup = lookup
        self._clock = clock
        self._first = first
        if metrics is None and config.metrics_port:
            metrics = Metrics(config.proxy_timeout)
        self.metrics = metrics
        self.access_log = AccessLog() if config.access_log else None
        self.observer = combine(metrics, self.access_log, observer)
        self.source = source if source is not None else build_source(config, self.observer)
        if metrics is not None:
            metrics.track(self.source)
        self._drain_started: float | None = None
        self._proxy: Proxy | None = None
        self.heartbeat = probes.Heartbeat()
        if metrics is not None:
            metrics.route(probes.routes(lambda: probes.health(self.heartbeat), self.readiness))
        self._gate: Gate | None = None
        self._probes: dict[str, Probe] = {
            "/healthz": self._healthz,
            "/ready": self._ready,
            "/readyz": self._ready,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            probe = self._probes.get(scope["path"])
            if probe is not None and scope["method"] in ("GET", "HEAD"):
                await probe(send)
            elif self._proxy is not None:
                await self._proxy(scope, receive, send)
            else:
                await send_json(send, 503, {"detail": "The router is starting."})
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    @property
    def draining(self) -> bool:
        """Set by the server on SIGTERM (`router.server.DrainingServer`): `/ready` fails,
        and upgraded connections get what is left of `--shutdown-timeout` (`shutdown`)."""
        return self._drain_started is not None

    @draining.setter
    def draining(self, value: bool) -> None:
        self._drain_started = time.monotonic() if value else None

    async def _healthz(self, send: Send) -> None:
        await send_json(send, 200, {"status": "ok"})

    async def _ready(self, send: Send) -> None:
        await send_json(send, *self.readiness())

    def readiness(self) -> probes.Answer:
        """`/ready`'s answer; also asked from the metrics thread, so it only reads values
        that are replaced whole (the flags, the source's snapshot)."""
        snapshot = self.source.snapshot()
        status, body = probes.readiness(self.not_ready_reason(),
                                        len(snapshot.pods) if snapshot else 0)
        if status == 200:  # still served while the API fails: static stability
            error, age = self.source.last_error(), self.source.age()
            if error is not None and age is not None:
                body.update(stale_seconds=round(age, 1), last_error=error)
        return status, body

    def not_ready_reason(self) -> str | None:
        if self.draining:
            return "shutting down"
        if self._proxy is None:  # only the metrics thread can ask before start-up ends
            return "starting"
        beat = self.heartbeat.age()
        if beat is not None and beat > probes.STALL:  # the traffic port cannot answer
            return "event loop stalled"
        return self.source.not_ready_reason()

    async def startup(self) -> None:
        self.heartbeat.start()
        authorizer = await asyncio.to_thread(build_authorizer, self.config)  # first: may fail
        if authorizer is not None:
            self._gate = Gate(authorizer, self.config.namespace, pool_name(self.config))
        if self.metrics is not None and self.metrics.port is None:
            self.metrics.serve(self._metrics_socket())
        if self.access_log is not None:
            self.access_log.start()
        await self.source.start()
        targets = TargetPolicy(
            self.source,
            allow_loopback=self.config.allow_loopback_pod_ip,
            pod_cidr=self.config.pod_cidr,
            operator_chosen=self.config.static or self.source.operator_chosen,
        )
        self._client = upstream.Client(self._lookup, targets.permits,
                                       self.config.max_response_head)
        self._proxy = Proxy(self.config, self.source, self._client, self.observer, targets,
                            self._gate, self._clock, self._first)

    async def shutdown(self) -> None:
        if self._proxy is not None:
            # Upgraded connections are not uvicorn's to wait for (`HttpProtocol.become_tunnel`)
            spent = time.monotonic() - (self._drain_started or time.monotonic())
            await self._proxy.tunnels.drain(self.config.shutdown_timeout - spent)
            self._proxy = None
            await self._client.close()
        if self._gate is not None:
            await self._gate.authorizer.close()
            self._gate = None
        await self.source.stop()
        if self.access_log is not None:
            await asyncio.to_thread(self.access_log.stop)
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.close)
        self.heartbeat.stop()

    def _metrics_socket(self) -> socket.socket:
        host, port = self.config.host, self.config.metrics_port
        try:
            return bind(host, port)
        except OSError as exc:
            raise ConfigError(f"--metrics-port {port}: cannot listen on {host}: {exc.strerror}"
                              ) from None

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except ConfigError as exc:
                    log.error("start-up failed: %s", exc)
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                except Exception as exc:
                    log.exception("start-up failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return
