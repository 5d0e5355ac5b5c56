"""One proxied request: pick the target, try it (and, for the pool, the next ones), stream
the answer back, and map every failure to one `ProxyError`.

The retry rule is `router/replay.py`'s, applied in `Proxy._pool`: a pod that cannot be
connected to, or answers 503 to a replayable body, is skipped; any other answer, and any
failure after the request was written, is final, because replaying a request a pod may
have acted on could repeat its side effects. Each pool attempt's outcome also goes to the
pods' passive health (router/health.py), which decides the order of the requests after it.

An upgrade request (WebSocket) takes the same path, as a handshake without a body; a 101
from the pod turns the exchange into a tunnel (`Proxy._tunnel`, `router/tunnel.py`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from urllib.parse import quote

from router import replay, upstream
from router.asgi import Receive, Scope, Send
from router.authz import Gate
from router.balancer import FirstIndex, RoundRobin
from router.body import NO_BODY, Budget, ClientGone, RequestBody
from router.clients import client_address, client_key, is_trusted_peer
from router.config import Config
from router.connection import Response
from router.errors import (
    ConnectFailed,
    ProxyError,
    TargetRefused,
    UpstreamFailed,
    UpstreamTimeout,
    busy,
    no_pods,
    send_error,
)
from router.headers import (
    UPGRADE_WITH_BODY,
    Incoming,
    Pinned,
    declares_body,
    parse_pinned,
    read_request,
    response_headers,
    switching_head,
    upgrade_protocol,
    upgrade_request,
    upstream_timeout,
    websocket_only,
)
from router.health import Clock, Health
from router.limits import too_large, upgrade_max_default
from router.observe import Exchange, Observer, Outcome
from router.pods import Pod, PodSource
from router.protocol import BODY_TOO_LARGE, DISCONNECT, UPGRADE, ClientUpgrade, ClientWatch
from router.targets import TargetPolicy
from router.tunnel import Tunnel, Tunnels

log = logging.getLogger("router.proxy")

# nginx's code for "client closed the request", for the access log.
CLIENT_CLOSED = 499
SHUTTING_DOWN = ProxyError(503, "The router is shutting down.")


class Proxy:
    """The ASGI handler for every request that is not a probe."""

    def __init__(
        self,
        config: Config,
        source: PodSource,
        client: upstream.Client,
        observer: Observer,
        targets: TargetPolicy,
        gate: Gate | None = None,
        clock: Clock = time.monotonic,
        first: FirstIndex = random.randrange,
    ) -> None:
        self._config = config
        self._source = source
        self._client = client
        self._observer = observer
        self._targets = targets
        self._gate = gate  # None: --authz-mode allow-all
        self._health = Health(observer, clock)
        self._balancer = RoundRobin(config.max_attempts, self._health, first, clock)
        self._timeout = upstream.Timeout(config.proxy_timeout, config.connect_timeout)
        self._retry_budget = Budget(config.retry_body_budget)
        self._max_body = config.max_body_size  # tested first: 0 (no limit) calls nothing
        self._loop = asyncio.get_running_loop()  # made at start-up, in the serving loop
        self.tunnels = Tunnels(config.upgrade_max_per_client,
                               upgrade_max_default() if config.upgrade_max is None
                               else config.upgrade_max)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        extensions = scope.get("extensions")
        watch: ClientWatch | None = extensions.get(DISCONNECT) if extensions else None
        if watch is not None:
            watch.task = asyncio.current_task(self._loop)
        client = scope.get("client")
        incoming = read_request(scope, trusted_peer=is_trusted_peer(
            client[0] if client else "", self._config.trusted_proxy_cidrs))
        exchange = Exchange(
            method=scope["method"],
            path=scope["path"],
            client=client[0] if client else None,
            request_id=incoming.request_id,
            route="pool" if incoming.sandbox_id is None else "pinned",
            started=time.perf_counter(),
        )
        self._observer.request_started(exchange.route)
        own_headers = [(b"x-request-id", incoming.request_id.encode("latin-1"))]
        body: RequestBody | None = None
        upgrade = self._upgrade(scope, incoming, extensions)
        reserved = False
        served: Pod | None = None  # the pool pod whose answer this is
        try:
            pinned = None
            if watch is not None and watch.expired is not None:
                raise watch.expired  # in the read that began it: a bad chunk line, say
            if incoming.refused is not None:
                raise incoming.refused
            if self._max_body and too_large(incoming.content_length or 0, self._max_body):
                raise BODY_TOO_LARGE  # unread: the connection closes (`HttpProtocol.linger`)
            if incoming.sandbox_id is not None:  # refused before the body is read
                pinned = parse_pinned(incoming, allow_loopback=self._config.allow_loopback_pod_ip)
            if self._gate is not None:  # also before the body is read; takes Authorization
                await self._gate.check(incoming, pinned, exchange)
            if upgrade is not None:
                if declares_body(scope["headers"]):
                    raise UPGRADE_WITH_BODY
                self.tunnels.reserve(upgrade[1])  # before any pod is asked
                reserved = True
            if incoming.bodiless:
                body = NO_BODY
            else:
                body = await RequestBody.read(
                    receive, incoming.content_length, self._config.retry_body_limit,
                    self._retry_budget)
            if pinned is None:
                response, pod = await self._pool(scope, incoming, body, exchange,
                                                 upgrade is not None)
                served = pod
                own_headers.append((b"x-sandbox-id", pod.sandbox_id.encode()))
                own_headers.append((b"x-sandbox-namespace", pod.namespace.encode()))
            else:
                exchange.pod, exchange.namespace = pinned.sandbox_id, pinned.namespace
                response = await self._pinned(scope, incoming, pinned, body, exchange,
                                              upgrade is not None)
            if response.status == 101:  # asked for (`upgrade`): else `Response` refuses it
                assert upgrade is not None
                await self._tunnel(response, upgrade[0], own_headers, exchange, watch)
            else:
                await self._relay(response, send, own_headers, exchange, watch)
        except ProxyError as error:
            # Some are shared instances (module constants): the traceback a raise left on
            # one would keep this request's frames, and all they hold, until the next.
            error.__traceback__ = None
            exchange.status = error.status
            exchange.bytes_out = await send_error(send, error, tuple(own_headers))
        except ClientGone:
            exchange.status = CLIENT_CLOSED
        except asyncio.CancelledError:
            # The client went away (see `ClientWatch`: logged 499 below), or was too slow
            # (`ClientWatch.expire`: its 408), or uvicorn cancels what is still running when
            # --shutdown-timeout runs out: then answer 503 if nothing was sent yet. Either
            # way the request ends quietly, not as a crash.
            if exchange.status == 0 and not (watch is not None and watch.gone):
                reason = watch.expired if watch is not None and watch.expired else SHUTTING_DOWN
                exchange.status = reason.status
                exchange.bytes_out = await send_error(send, reason, tuple(own_headers))
        finally:
            if watch is not None:
                watch.task = None
                if watch.gone:  # however the request ended, nobody got the answer
                    exchange.status = CLIENT_CLOSED
            if served is not None:
                self._balancer.finished(served)
            if body is not None and body is not NO_BODY:  # one call less for most requests
                exchange.bytes_in += body.size
                body.release()
            exchange.duration = time.perf_counter() - exchange.started
            if reserved:
                assert upgrade is not None
                self.tunnels.release(upgrade[1])
            self._observer.request_finished(exchange)

    def _upgrade(self, scope: Scope, incoming: Incoming, extensions: dict[str, object] | None
                 ) -> tuple[ClientUpgrade, str] | None:
        """For a request asking for an upgrade (`router.protocol.UPGRADE`): its client
        connection and who the client is for `--upgrade-max-per-client`; its headers
        for the pod become a handshake's (`upgrade_request`)."""
        handle = extensions.get(UPGRADE) if extensions else None
        if not isinstance(handle, ClientUpgrade):
            return None
        protocol = upgrade_protocol(scope["headers"])
        if protocol is None:
            return None
        incoming.forward = upgrade_request(incoming.forward, protocol)
        peer = scope.get("client")
        address = client_address(peer[0] if peer else "", scope["headers"],
                                 self._config.trusted_proxy_cidrs)
        return handle, client_key(address)

    async def _pool(
        self, scope: Scope, incoming: Incoming, body: RequestBody, exchange: Exchange,
        upgrade: bool = False,
    ) -> tuple[Response, Pod]:
        snapshot = self._source.snapshot()
        if snapshot is None or not snapshot.pods:
            raise no_pods()
        limits = self._request_timeout(incoming)
        target = _raw_path_qs(scope)
        saw_busy = False
        for pod in self._balancer.order(snapshot.pods):
            exchange.attempts += 1
            exchange.pod, exchange.namespace = pod.name, pod.namespace  # the last one tried
            try:
                response = await self._client.request(
                    scope["method"], pod.ip, pod.port, target, incoming.forward, body.data(),
                    limits, incoming.content_length, upgrade)
            except ConnectFailed as error:
                self._health.failed(pod, "failed", error)
                self._observer.attempt("connect_error")
                continue
            except (UpstreamTimeout, UpstreamFailed) as error:
                self._observer.attempt(_outcome(error))
                # A timeout the client shortened (`X-Sandbox-Timeout`) is its deadline, not
                # the pod's failure: else any client could cool every pod down at will.
                if not (isinstance(error, UpstreamTimeout)
                        and limits.read < self._config.proxy_timeout):
                    self._health.failed(pod, "failed", error)
                raise
            if response.status == 503:
                self._health.failed(pod, "busy")
            else:
                self._health.succeeded(pod)
            if replay.to_next_pod(response.status, body.replayable):
                self._observer.attempt("busy")
                self._balancer.busy(pod)
                saw_busy = True
                response.abandon()  # the next pod does not wait for this one's body
                continue
            self._observer.attempt("busy" if response.status == 503 else "ok")
            self._balancer.served(pod)
            return response, pod
        if saw_busy:
            raise busy()
        raise ProxyError(502, "Could not connect to any warm pool pod.")

    async def _pinned(
        self,
        scope: Scope,
        incoming: Incoming,
        pinned: Pinned,
        body: RequestBody,
        exchange: Exchange,
        upgrade: bool = False,
    ) -> Response:
        """The one sandbox the client named; its answer, 503 included, is final. Target: the
        indexed pod of that name (a hint cannot redirect a sandbox the router knows), else
        the given pod IP if `admits_hint` (inside --pod-cidr, no other sandbox's address),
        else the cluster DNS name."""
        snapshot = self._source.snapshot()
        pod = snapshot.by_name.get((pinned.namespace, pinned.sandbox_id)) if snapshot else None
        if pod:
            host = pod.ip
        elif pinned.pod_ip and self._targets.admits_hint(pinned.pod_ip):
            host = pinned.pod_ip
        else:
            host = f"{pinned.sandbox_id}.{pinned.namespace}.svc.{self._config.cluster_domain}"
        port = pinned.port or (pod.port if pod else self._config.pod_port)
        exchange.attempts = 1
        try:
            response = await self._client.request(
                scope["method"], host, port, _raw_path_qs(scope), incoming.forward,
                body.data(), self._request_timeout(incoming), incoming.content_length, upgrade)
        except ConnectFailed as error:
            self._observer.attempt("connect_error")
            if isinstance(error, TargetRefused):
                raise
            raise ProxyError(
                502, f"Could not connect to the backend sandbox: {pinned.sandbox_id}"
            ) from None
        except (UpstreamTimeout, UpstreamFailed) as error:
            self._observer.attempt(_outcome(error))
            raise
        self._observer.attempt("ok")
        return response

    def _request_timeout(self, incoming: Incoming) -> upstream.Timeout:
        if incoming.sandbox_timeout is None:
            return self._timeout
        seconds = upstream_timeout(incoming.sandbox_timeout, self._config.proxy_timeout)
        return upstream.Timeout(seconds, self._config.connect_timeout)

    async def _relay(
        self,
        response: Response,
        send: Send,
        own_headers: list[tuple[bytes, bytes]],
        exchange: Exchange,
        watch: ClientWatch | None,
    ) -> None:
        """Stream the pod's answer as it arrives (or, when it is all in already, pass it in
        one message). A client leaving cancels the request (`ClientWatch`), which ends the loop
        even while the pod is silent; the pod's connection is closed on the way out. A pod
        failing mid-answer ends the client's connection too."""
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status,
                    "headers": response_headers(
                        response.raw_headers, own_headers, response.status
                    ),
                }
            )
            exchange.status = response.status
            whole = response.whole()
            if whole is not None:  # the answer is all in: one message, no watcher needed
                exchange.bytes_out = len(whole)
                await send({"type": "http.response.body", "body": whole})
                return
            # The head goes out now, not with the first piece of body (router/cycle.py): a
            # stream's client learns at once that the pod answered.
            await send({"type": "http.response.body", "body": b"", "more_body": True})
            async for chunk in response.chunks():
                exchange.bytes_out += len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except (UpstreamTimeout, UpstreamFailed) as exc:
            # Headers are out: the only honest signal left is an incomplete response.
            log.warning("upstream failed mid-response from %s (request %s): %r",
                        exchange.pod, exchange.request_id, exc)
            if watch is not None:
                watch.cut()
        finally:
            response.release()

    async def _tunnel(
        self,
        response: Response,
        upgrade: ClientUpgrade,
        own_headers: list[tuple[bytes, bytes]],
        exchange: Exchange,
        watch: ClientWatch | None,
    ) -> None:
        """The pod switched protocols: relay its 101, join the two connections, and wait
        for the tunnel to end (which this request's access line and duration cover)."""
        pod, pod_early = response.detach()
        head = switching_head(response.raw_headers, own_headers)
        if watch is not None:
            watch.task = None  # the tunnel sees the client leave from now on
        client, client_early, client_fin = upgrade.take()
        tunnel = Tunnel(client, client_early, pod, pod_early, head,
                        self._config.upgrade_idle_timeout, self._config.upgrade_max_lifetime,
                        half_close=not websocket_only(response.raw_headers),
                        client_fin=client_fin)
        exchange.status = 101
        self.tunnels.add(tunnel)
        self._observer.upgraded(exchange)
        try:
            await tunnel.done
        except asyncio.CancelledError:
            tunnel.abort("the router is stopping")
            raise
        finally:
            self.tunnels.remove(tunnel)
            exchange.bytes_in, exchange.bytes_out = tunnel.bytes_in, tunnel.bytes_out


def _raw_path_qs(scope: Scope) -> str:
    """The path and query exactly as the client sent them: no decoding, no dot folding."""
    raw = scope.get("raw_path")
    path = raw.decode("latin-1") if raw else quote(scope["path"])
    query: bytes = scope.get("query_string", b"")
    return f"{path}?{query.decode('latin-1')}" if query else path


def _outcome(error: ProxyError) -> Outcome:
    return "timeout" if isinstance(error, UpstreamTimeout) else "error"
