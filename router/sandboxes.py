"""The Kubernetes pod source: the warm pool, and the sandbox index next to it.

Two watches (`router/kube.py`'s `PodWatch`), each on a thread of its own:

- the pool: pods of `--namespace` matching `--selector` (or `--warm-pool`), the rotation
  of un-pinned requests. A claimed pod loses its warm-pool label, so the API server sends
  it as DELETED to this watch and it leaves the rotation at once (within `--cache-ttl`
  even if that event were missed, since the watch is re-opened at least that often);
- the index: every pod carrying `agents.x-k8s.io/sandbox-name-hash` (every sandbox pod,
  claimed or not, pooled or not), of `--namespace` or with `--all-namespaces` of all of
  them. Pinned requests find a sandbox here by (namespace, sandbox name), without DNS
  (router/sandbox_ids.py).

Why two watches rather than one on the sandbox label with the pool filtered in memory:
`--selector` is any label selector, which the API server evaluates exactly as kubectl does
(set-based forms included) and which may select pods that carry no sandbox label (a pool
of plain pods, a controller version whose warm pods are not yet sandboxes); one watch would
need a selector engine of our own that matches the server's, and would miss those pools.
The cost of the second watch is one more long poll per replica and each pool pod held
twice as a `Pod` value (about 200 bytes: see docs/kubernetes.md for the measured figure).

The request path reads one immutable `Snapshot` holding both, rebuilt after a change of
either; readiness, age and errors are those of the worse of the two watches, so static
stability holds for the index as for the pool: through an API outage the last good lists
are served, marked stale.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from kubernetes import client as k8s

from router.config import Config
from router.kube import INDEX, POOL, PodWatch, Query, connect, label_selector
from router.observe import Observer
from router.pods import Snapshot
from router.sandbox_ids import SANDBOX_LABEL

log = logging.getLogger("router.sandboxes")

STOP_WAIT = 1.0
"""Seconds the watch threads get, together, to end at shutdown."""


class KubernetesPodSource:
    """The pool and the sandbox index, each kept by its own list + watch."""

    operator_chosen = False

    def __init__(self, config: Config, observer: Observer) -> None:
        self._config = config
        self._observer = observer
        self._queries = (
            Query(POOL, config.namespace, label_selector(config)),
            Query(INDEX, None if config.all_namespaces else config.namespace, SANDBOX_LABEL),
        )
        self._watches: tuple[PodWatch, ...] = ()
        self._snapshot: Snapshot | None = None
        self._publishing = threading.Lock()
        self._stopping = threading.Event()
        self._api: k8s.CoreV1Api | None = None

    # The request path: reads only.

    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    def age(self) -> float | None:
        """Seconds since the API last confirmed the older of the two lists; None before
        both have synced."""
        if not self._watches or any(watch.pods is None for watch in self._watches):
            return None
        return time.monotonic() - min(watch.confirmed_at for watch in self._watches)

    def last_error(self) -> str | None:
        """Why the API last failed, while that failure is not yet made good; None while
        both lists are fresh."""
        return next((watch.error for watch in self._watches if watch.error), None)

    def not_ready_reason(self) -> str | None:
        age = self.age()
        error = self.last_error()
        detail = f": {error}" if error else ""
        if age is None:
            return f"pod list not synced yet{detail}"
        if self._config.max_stale and age > self._config.max_stale:
            return f"pod list is stale ({age:.0f} s since the last sync){detail}"
        return None

    # Lifecycle, from the app's lifespan.

    async def start(self) -> None:
        """Loads the client configuration (fails start-up if there is none) and starts the
        threads; does not wait for the first lists: `/ready` reports them."""
        api_client = await asyncio.to_thread(connect, self._config)
        self._api = k8s.CoreV1Api(api_client)
        self._watches = tuple(
            PodWatch(self._api, query, self._config, self._observer, self._publish,
                     self._stopping)
            for query in self._queries
        )
        for watch, name in zip(self._watches, ("pod-watch", "sandbox-watch"), strict=True):
            watch.start(name)

    async def stop(self) -> None:
        self._stopping.set()
        for watch in self._watches:
            watch.interrupt()
        # A watch thread blocked in a call that hangs (no answer yet: nothing to
        # interrupt) is a daemon: waited for briefly, together, not a window each.
        deadline = time.monotonic() + STOP_WAIT
        for watch in self._watches:
            await asyncio.to_thread(watch.join, max(0.0, deadline - time.monotonic()))
        if self._api is not None:  # closing its pools may block: off the loop
            await asyncio.to_thread(self._api.api_client.close)

    def _publish(self) -> None:
        """Called by either watch after its pods changed: one new snapshot of both, once
        the pool has been listed (before that the router has nothing to serve)."""
        with self._publishing:
            pool, index = (watch.pods for watch in self._watches)
            if pool is not None:
                before = self._snapshot.shared if self._snapshot is not None else frozenset()
                self._snapshot = Snapshot.of(pool, index or ())
                _warn_shared(before, self._snapshot.shared)


def _warn_shared(before: frozenset[tuple[str, str]], now: frozenset[tuple[str, str]]) -> None:
    """A warning when the names two pods answer to change (`Snapshot`), not at every
    rebuild of the index while one lasts."""
    if now == before:
        return
    if now:
        log.warning("sandbox index: names answered to by more than one pod, left to DNS: %s",
                    ", ".join(sorted(f"{ns}/{name}" for ns, name in now)))
    else:
        log.info("sandbox index: every name is answered to by one pod again")
