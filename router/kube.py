"""Kubernetes pods kept by list + watch: `PodWatch` holds the usable pods of one query (a
namespace or all of them, a label selector) on a background thread of its own, and the
API client configuration they share. `router/sandboxes.py` builds the pool and the sandbox
index from two of them.

The request path only reads what a watch published: no request waits on the API, and the
API load is one list plus one watch per `--cache-ttl` window whatever the traffic. The
official client is synchronous, so it never runs on the event loop; each watch gets its
own thread rather than a slot of the default executor, so at most one API call per watch
is in flight per process.

Freshness: the watch is opened with a server-side timeout of `--cache-ttl` (whole seconds,
at least 1), so while the API answers, the list is re-confirmed at least that often (at
the end of each watch, and on every event or bookmark); a read timeout a little longer
than that window means a half-open connection cannot park the thread. A full re-list runs
every `relist_every` as insurance against a missed event, and at once after a 410 Gone.
Errors are logged, counted and retried with jittered backoff capped at `--cache-ttl`.

Static stability: once a list has succeeded, an API outage never empties it nor fails
`/ready` (unless `--max-stale` asks for that): the last good list keeps being served, marked
stale (`error`), with a warning line a minute, since a control-plane outage must not
become a data-plane one (kube-proxy and Envoy's EDS do the same).
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

import yaml
from kubernetes import client as k8s
from kubernetes import config as kubeconfig
from kubernetes.watch.watch import iter_resp_lines

from router.config import DEFAULT_SELECTOR, Config, ConfigError
from router.observe import Observer
from router.pods import Pod
from router.sandbox_ids import fnv1a_32, sandbox_id

log = logging.getLogger("router.kube")

POOL = "pod list"
INDEX = "sandbox index"

WATCH_READ_SLACK = 5.0
"""Seconds a watch may stay silent past its server timeout before it is taken for dead."""

LIST_READ_TIMEOUT = 30.0
"""Seconds to wait for a list answer: long enough for thousands of pods on a busy API."""

LIST_PAGE = 500
"""Pods per list answer (`limit`, as kubectl and client-go's informers ask): a sync reads
and parses one page at a time, so its memory follows a page of pod objects, not every
pod of the namespace (5,000 pods of 8 KB in one answer took the router to 401 MiB)."""

MIN_WATCH = 0.5
"""A watch that ended sooner than this (seconds) without failing is backed off from, as one
that failed, rather than reopened at once (client-go's reflector does the same)."""

WARN_EVERY = 60.0
"""Seconds between warning lines while the API keeps failing: one line a minute says the
outage lasts without flooding the log at every retry."""

Object = Mapping[str, Any]


def label_selector(config: Config) -> str:
    """`--warm-pool NAME` selects that pool's hash label; else `--selector` as given."""
    if config.warm_pool:
        return f"{DEFAULT_SELECTOR}={fnv1a_32(config.warm_pool)}"
    return config.selector


def candidate(obj: Object, port: int) -> Pod | None:
    """The `Pod` to route to, if this API object is a ready, running, addressed pod that
    is not being deleted; None for every other pod (and for malformed objects)."""
    meta, status = _field(obj, "metadata"), _field(obj, "status")
    if meta.get("deletionTimestamp") or status.get("phase") != "Running":
        return None
    conditions = status.get("conditions")
    ready = isinstance(conditions, list) and any(
        isinstance(c, dict) and c.get("type") == "Ready" and c.get("status") == "True"
        for c in conditions
    )
    ip, name, namespace = status.get("podIP"), meta.get("name"), meta.get("namespace")
    if not (ready and _text(ip) and _text(name) and _text(namespace)):
        return None
    sandbox = sandbox_id(meta, name)
    return Pod(name, namespace, ip, port, "" if sandbox == name else sandbox)


class Expired(Exception):
    """The watch's resourceVersion was compacted away (410 Gone): re-list."""


@dataclass(frozen=True)
class Schedule:
    """How often the thread talks to the API, derived from `--cache-ttl`."""

    watch_window: int
    relist_every: float
    backoff_first: float
    backoff_cap: float

    @classmethod
    def of(cls, cache_ttl: float) -> Schedule:
        # A re-list only guards against a missed event (watches from a resourceVersion do
        # not skip any), so it can be rare: 20 watch windows, between 30 s and 5 minutes.
        return cls(
            watch_window=max(1, int(cache_ttl)),
            relist_every=min(300.0, max(30.0, 20 * cache_ttl)),
            backoff_first=min(0.25, cache_ttl),
            backoff_cap=cache_ttl,
        )


def connect(config: Config) -> k8s.ApiClient:
    """An API client from `--kubeconfig`/`KUBECONFIG`, else the in-cluster service account.
    Blocking (it reads files): called from a worker thread. Whatever is wrong with the
    configuration is one `ConfigError` naming it, never a traceback."""
    try:
        configuration = k8s.Configuration()
        # No silent re-sends by urllib3 (3 by default): a hung call would fail only after
        # four read timeouts, unseen in /ready and the log; the watch loop retries itself.
        configuration.retries = False
        if config.kubeconfig:
            check_kubeconfig(config.kubeconfig)
            kubeconfig.load_kube_config(config_file=config.kubeconfig,
                                        client_configuration=configuration)
        else:
            kubeconfig.load_incluster_config(client_configuration=configuration)
        return k8s.ApiClient(configuration)
    except (kubeconfig.ConfigException, OSError, ValueError) as exc:
        raise _unusable(config, str(exc)) from None
    except (TypeError, AttributeError, KeyError) as exc:
        # How the client reports a malformed structure inside the mapping (clusters that
        # are a number, say): whatever its lookups happen to raise.
        raise _unusable(config, f"malformed kubeconfig ({type(exc).__name__}: {exc})"
                        ) from None


def _unusable(config: Config, problem: str) -> ConfigError:
    where = f"--kubeconfig {config.kubeconfig}" if config.kubeconfig else "in-cluster"
    return ConfigError(
        f"cannot load the Kubernetes configuration ({where}): {problem}; "
        "set --kubeconfig or KUBECONFIG, run in a pod, or use --pods/--demo"
    )


def check_kubeconfig(path: str) -> None:
    """Raises OSError or ValueError unless `path` is a readable file holding a YAML mapping.
    The client would read it too, but it reports YAML that is not a mapping (a list, a
    scalar) as a TypeError from deep in its merge code, and a syntax error over several
    lines: checked first, so the one line names the actual problem."""
    with open(path, encoding="utf-8") as file:  # missing, a directory, unreadable
        text = file.read()
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ValueError(f"not valid YAML: {getattr(exc, 'problem', None) or exc}{where}"
                         ) from None
    if document is None:
        raise ValueError("the file is empty")
    if not isinstance(document, dict):
        kind = "a list" if isinstance(document, list) else "a single value"
        raise ValueError(f"not a kubeconfig: a YAML mapping is expected, the file holds {kind}")


@dataclass(frozen=True)
class Query:
    """What one watch keeps: the pods of `namespace` (None: of every namespace) that match
    `selector`, named `what` in log lines ("pod list", "sandbox index")."""

    what: str
    namespace: str | None
    selector: str


class PodWatch:
    """The usable pods of one `Query`, kept by list + watch on a thread of its own.

    Only the `Pod` values are kept, never the API objects: a pod the router cannot use is
    dropped, so memory follows the ready pods, a few hundred bytes each. After each change
    the new `pods` tuple is published and `on_change` called (from the thread); `pods` is
    None until the first list."""

    def __init__(self, api: k8s.CoreV1Api, query: Query, config: Config, observer: Observer,
                 on_change: Callable[[], None], stopping: threading.Event) -> None:
        self.query = query
        self.pods: tuple[Pod, ...] | None = None
        self.confirmed_at = 0.0
        self.error: str | None = None
        self._api = api
        self._config = config
        self._observer = observer
        self._on_change = on_change
        self._stopping = stopping
        self._schedule = Schedule.of(config.cache_ttl)
        self._warned_at: float | None = None  # the last warning (at most one a minute)
        self._warned = False  # a warning was logged that no "answers again" line followed
        self._kept: dict[str, Pod] = {}
        self._changed = False
        self._thread: threading.Thread | None = None
        self._response: Any = None

    def start(self, name: str) -> None:
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def interrupt(self) -> None:
        """Unblocks a read in progress on the watch thread (`stopping` is set first)."""
        response = self._response
        if response is not None:
            response.shutdown()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        delay = self._schedule.backoff_first
        expired = 0  # 410s since a watch last ran its course
        while not self._stopping.is_set():
            try:
                version = self._list()
                relist_at = time.monotonic() + self._schedule.relist_every
                while not self._stopping.is_set() and time.monotonic() < relist_at:
                    opened = time.monotonic()
                    version = self._watch(version)
                    lasted = time.monotonic() - opened
                    if self._stopping.is_set():
                        return
                    if lasted >= MIN_WATCH:
                        # A watch ran its course: the API is healthy again (a list that
                        # succeeds while every watch fails is still an outage).
                        delay, expired = self._schedule.backoff_first, 0
                        self._confirm()
                        self._recovered()
                    else:  # nothing vouched for meanwhile: an outage, not a confirmation
                        self._failed(ValueError(f"a watch ended after {lasted:.2f} s"))
                        delay = self._back_off(delay)
            except Expired:
                log.info("%s history expired (410 Gone); re-listing", self.query.what)
                expired += 1
                if expired > 1:  # once is routine; again and again, an outage
                    self._failed(ValueError(f"history expired {expired} times in a row"))
                delay = self._back_off(delay)
            except Exception as exc:
                if self._stopping.is_set():
                    return
                self._failed(exc)
                delay = self._back_off(delay)

    def _back_off(self, delay: float) -> float:
        """Wait a jittered `delay` (or until stopping); returns the next one."""
        self._stopping.wait(random.uniform(delay / 2, delay))
        return min(delay * 2, self._schedule.backoff_cap)

    def _call(self, **options: Any) -> Any:
        """One list or watch call: namespaced, or across every namespace."""
        if self.query.namespace is None:
            return self._api.list_pod_for_all_namespaces(
                label_selector=self.query.selector, _preload_content=False, **options)
        return self._api.list_namespaced_pod(
            self.query.namespace, label_selector=self.query.selector, _preload_content=False,
            **options)

    def _list(self) -> str:
        """The whole list, a page at a time (the pages are one snapshot: the API server
        serves them at the first one's resourceVersion); its usable pods replace the
        previous ones. Returns the version to watch from."""
        kept: dict[str, Pod] = {}
        token: str | None = None
        while True:
            options: dict[str, Any] = {"limit": LIST_PAGE}
            if token:
                options["_continue"] = token
            try:
                response = self._call(
                    _request_timeout=(self._config.connect_timeout, LIST_READ_TIMEOUT),
                    **options)
            except k8s.ApiException as exc:
                if exc.status == 410 and token:  # the pages' snapshot is compacted: again
                    raise Expired() from None
                raise  # a first page refused is a failure like any other
            body = _json(response.data)
            items, metadata = body.get("items"), body.get("metadata") or {}
            version = metadata.get("resourceVersion")
            if not isinstance(items, list) or not version:
                raise ValueError("pod list answer has no items or no resourceVersion")
            self._keep_usable(items, kept)
            token = metadata.get("continue")
            if not token:
                break
        self._changed = self._changed or kept != self._kept
        self._kept = kept
        self._confirm()
        return str(version)

    def _keep_usable(self, items: list[Any], kept: dict[str, Pod]) -> None:
        for item in items:
            if isinstance(item, dict) and (key := _key(item)):
                pod = candidate(item, self._config.pod_port)
                if pod is not None:
                    kept[key] = pod

    def _watch(self, version: str) -> str:
        """One watch from `version` until the server ends it; returns the last version."""
        window = self._schedule.watch_window
        try:
            self._response = self._call(
                watch=True,
                allow_watch_bookmarks=True,
                resource_version=version,
                timeout_seconds=window,
                _request_timeout=(self._config.connect_timeout, window + WATCH_READ_SLACK),
            )
        except k8s.ApiException as exc:
            if exc.status == 410:
                raise Expired() from None
            raise
        try:
            for event in _events(self._response):
                version = self._apply(event) or version
                if self._stopping.is_set():
                    break
        finally:
            self._response.release_conn()
            self._response = None
        return version

    def _apply(self, event: Object) -> str | None:
        kind, obj = event.get("type"), event.get("object")
        if not isinstance(obj, dict):
            raise ValueError(f"watch event {kind!r} has no object")
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise Expired()
            raise ValueError(f"watch error {obj.get('code')}: {obj.get('message')}")
        key = _key(obj)
        if kind in ("ADDED", "MODIFIED", "DELETED"):
            if key:  # else an object with no name: no pod to keep or drop
                self._keep(key, candidate(obj, self._config.pod_port)
                           if kind != "DELETED" else None)
        elif kind != "BOOKMARK":
            raise ValueError(f"unexpected watch event {kind!r}")
        self._confirm(report=False)
        version = _field(obj, "metadata").get("resourceVersion")
        return str(version) if version else None

    def _keep(self, key: str, pod: Pod | None) -> None:
        """The pod an event leaves under `key`: kept, replaced, or (None) dropped."""
        if pod is None:
            self._changed = self._kept.pop(key, None) is not None or self._changed
        elif self._kept.get(key) != pod:
            self._kept[key] = pod
            self._changed = True

    def _confirm(self, report: bool = True) -> None:
        """The API just vouched for the kept pods: publish them if they changed."""
        self.confirmed_at = time.monotonic()  # first: a reader seeing the pods sees them fresh
        previous = pods = self.pods
        if pods is None or self._changed:
            self.pods = pods = tuple(self._kept.values())
            self._changed = False
            _log_change(self.query.what, previous, pods)
            self._on_change()
        if report:
            self._observer.pod_list_refreshed("ok")

    def _recovered(self) -> None:
        """A watch ran its course: the outage, if any, is over (a list alone does not end
        it: lists may answer while every watch is refused)."""
        if self._warned and self.pods is not None:
            log.info("the Kubernetes API answers again: %s confirmed (%d pods)",
                     self.query.what, len(self.pods))
            self._warned = False
        self.error = None

    def _failed(self, exc: Exception) -> None:
        self.error = _describe(exc)
        self._observer.pod_list_refreshed("error")
        now = time.monotonic()
        if self._warned_at is not None and now - self._warned_at < WARN_EVERY:
            return
        self._warned_at = now
        self._warned = True
        what = self.query.what
        if self.pods is None:
            log.warning("%s refresh failed: %s", what, self.error)
        else:
            log.warning("%s is stale (%.0f s since the API last confirmed it): still "
                        "routing over its %d pods; %s", what, now - self.confirmed_at,
                        len(self.pods), self.error)


def _events(response: Any) -> Iterator[Object]:
    for line in iter_resp_lines(response):
        if line:
            yield _json(line)


def _json(data: bytes | str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError:
        raise ValueError("the API answered something that is not JSON") from None
    if not isinstance(value, dict):
        raise ValueError("the API answered JSON that is not an object")
    return value


def _key(obj: Object) -> str:
    meta = _field(obj, "metadata")
    name, namespace = meta.get("name"), meta.get("namespace", "")
    return f"{namespace}/{name}" if _text(name) and isinstance(namespace, str) else ""


def _field(obj: Object, name: str) -> Object:
    """An object's sub-object, empty if it is missing or not an object."""
    value = obj.get(name)
    return value if isinstance(value, Mapping) else {}


def _text(value: object) -> TypeGuard[str]:
    """A non-empty string (a malformed object's field may be anything)."""
    return isinstance(value, str) and value != ""


def _describe(exc: Exception) -> str:
    """One line for logs and `/ready`: the API's status and reason, not a traceback."""
    if isinstance(exc, k8s.ApiException):
        return f"Kubernetes API answered {exc.status} {exc.reason}".strip()
    return f"{type(exc).__name__}: {exc}"


def _log_change(what: str, previous: tuple[Pod, ...] | None, current: tuple[Pod, ...]) -> None:
    """The pool's changes name the pods (a handful); the index's are counted, at debug level
    (it may hold thousands of sandboxes of every namespace)."""
    before = {(pod.namespace, pod.name) for pod in previous or ()}
    after = {(pod.namespace, pod.name) for pod in current}
    if what != POOL:
        log.debug("%s changed: %d pods (%d added, %d removed)",
                  what, len(after), len(after - before), len(before - after))
        return
    log.info(
        "pod list changed: %d pods (added %s, removed %s)", len(after),
        sorted(name for _, name in after - before) or "none",
        sorted(name for _, name in before - after) or "none",
    )
