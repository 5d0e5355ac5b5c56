"""`/healthz` and `/ready` for Kubernetes, answered off the serving event loop.

On the main port the probes share the loop, the listener and uvicorn's
`--limit-concurrency` with proxied traffic: under overload they wait behind it or are
refused with it, and a replica that is only busy looks broken (bench/probes.py measures
it). So they are answered also by the `--metrics-port` listener, which runs in a thread of
its own, and keep what each must detect:

- `/healthz` fails when the serving loop is wedged. The loop stamps a heartbeat every
  `BEAT` seconds (one timer per process; the request path is untouched); the thread
  answers 503 once the last stamp is older than `STALL`, far above the few hundred
  milliseconds a saturated loop that still works takes between two turns.
- `/ready` makes the same decision as on the main port (`Router.not_ready_reason`: the
  first pod-list sync done, not draining), from values other threads already read.

With `--workers N` the supervisor's listener asks every worker's (`gathered`).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from wsgiref.types import StartResponse, WSGIApplication

BEAT = 0.5
"""Seconds between two heartbeats of the serving loop."""

STALL = 5.0
"""A heartbeat older than this fails `/healthz`. The largest age seen under the overloads
of bench/probes.py was 0.92 s (docs/kubernetes.md)."""

ASK_WORKER = 1.0
"""Seconds the supervisor waits for a worker's answer (on loopback it takes milliseconds,
also under load: the worker answers from its own probe thread)."""

PATHS = ("/healthz", "/ready", "/readyz")

Answer = tuple[int, dict[str, Any]]


class Heartbeat:
    """When the serving loop last ran a timer of its own. Started and stopped on that loop
    (the app's lifespan); `age` is read from any thread (one float, set in one step)."""

    def __init__(self, period: float = BEAT) -> None:
        self._period = period
        self._last: float | None = None
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._beat()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._last = None

    def _beat(self) -> None:
        self._last = time.monotonic()
        self._timer = asyncio.get_running_loop().call_later(self._period, self._beat)

    def age(self) -> float | None:
        """Seconds since the last beat; None when not beating (before start-up, after
        shutdown)."""
        last = self._last
        return None if last is None else time.monotonic() - last


def health(heartbeat: Heartbeat) -> Answer:
    """The admin `/healthz`: is the serving loop turning?"""
    age = heartbeat.age()
    if age is None:
        return 503, {"status": "not serving"}
    if age > STALL:
        return 503, {"status": "event loop stalled", "heartbeat_age": round(age, 3)}
    return 200, {"status": "ok", "heartbeat_age": round(age, 3)}


def readiness(reason: str | None, pods: int) -> Answer:
    """`/ready`, on either port: `reason` is why not, or None."""
    if reason is not None:
        return 503, {"status": "not ready", "reason": reason}
    return 200, {"status": "ready", "pods": pods}


def wsgi(answer: Callable[[], Answer]) -> WSGIApplication:
    """A WSGI app answering every request with `answer()` as JSON."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        status, payload = answer()
        body = json.dumps(payload, separators=(",", ":")).encode()
        start_response(f"{status} {http.client.responses[status]}",
                       [("Content-Type", "application/json"),
                        ("Content-Length", str(len(body)))])
        return [body]

    return app


def routes(healthz: Callable[[], Answer], ready: Callable[[], Answer]
           ) -> dict[str, WSGIApplication]:
    """The probe paths of an admin listener (`metrics.serve_registry`)."""
    return dict(zip(PATHS, map(wsgi, (healthz, ready, ready)), strict=True))


def ask(port: int, path: str) -> Answer:
    """A worker's answer to `path` on its loopback admin listener; no answer is a 503."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=ASK_WORKER)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        payload = json.loads(response.read())
        return response.status, payload if isinstance(payload, dict) else {}
    except (OSError, ValueError) as exc:
        return 503, {"status": "no answer", "reason": str(exc) or type(exc).__name__}
    finally:
        connection.close()


def gathered(ports: Callable[[], list[int]], workers: int, path: str) -> Answer:
    """`--workers N`: 200 only when every one of the N workers answers 200. The kernel
    hands each new connection to one of the workers' sockets, so any of them may get the
    next connection: a pod is
    healthy only if all are alive, and ready only if all can route (each has its own pod
    list, synced on its own). The workers are asked at once, each within `ASK_WORKER`."""
    found = ports()
    if len(found) < workers:
        return 503, {"status": "not serving",
                     "reason": f"{len(found)} of {workers} workers started"}
    with ThreadPoolExecutor(len(found), thread_name_prefix="probe") as pool:
        answers: Sequence[Answer] = list(pool.map(lambda port: ask(port, path), found))
    for index, (status, payload) in enumerate(answers):
        if status != 200:
            detail = payload.get("reason") or payload.get("status", status)
            return 503, {"status": "not ready" if path != "/healthz" else "unhealthy",
                         "reason": f"worker {index}: {detail}"}
    if path == "/healthz":
        return 200, {"status": "ok", "workers": workers}
    return readiness(None, min(int(payload.get("pods", 0)) for _, payload in answers))


def gathered_routes(ports: Callable[[], list[int]], workers: int
                    ) -> Mapping[str, WSGIApplication]:
    """The supervisor's probe paths, each asking every worker."""
    return routes(lambda: gathered(ports, workers, "/healthz"),
                  lambda: gathered(ports, workers, "/ready"))
