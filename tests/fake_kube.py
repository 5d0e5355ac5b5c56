"""A fake Kubernetes API server for the pod source: a real HTTP/1.1 server on loopback that
the official client reaches through a generated kubeconfig.

It speaks the wire format the router relies on: `GET /api/v1/namespaces/NS/pods` (and
`/api/v1/pods`, every namespace) as a PodList with a resourceVersion, label selectors
(equality, existence and set-based) and field selectors; `?watch=true` as a chunked
stream of newline-delimited JSON events (ADDED, MODIFIED, DELETED, BOOKMARK, ERROR) from a
resourceVersion, ended by the server after `timeoutSeconds`; an object leaving a watch's
selector is sent as DELETED, as the real API server does. Tests drive it: add, change and
delete pods, compact history (410 Gone), fail with a status, hang, drop open watches; every
call is counted. `POST /apis/authentication.k8s.io/v1/tokenreviews` answers TokenReviews
from `tokens` (a token and the audiences it was minted for) and `audience_blind`, counted as
"tokenreview".
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol, TypeVar

from router.sandbox_ids import SANDBOX_LABEL, fnv1a_32

TOKEN = "fake-token"
POOL_LABELS = {"agents.x-k8s.io/warm-pool-sandbox": "p"}
Obj = dict[str, Any]


class Addressed(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def ip(self) -> str: ...


P = TypeVar("P", bound=Addressed)  # a pod of a test


@dataclass(frozen=True)
class Call:
    verb: str  # "list", "watch" or "tokenreview"
    namespace: str  # "" for every namespace
    query: Mapping[str, str]
    at: float = field(default_factory=time.monotonic, compare=False)  # when it came


def sandbox_labels(name: str) -> dict[str, str]:
    """The label the controller stamps on the pod of sandbox `name`, pooled or not."""
    return {SANDBOX_LABEL: fnv1a_32(name)}


def adopted_by(sandbox: str) -> dict[str, Any]:
    """The fields of a warm pod once sandbox `sandbox` has adopted it, as the agent-sandbox
    controller leaves them: the warm-pool label gone, the sandbox label carrying the
    sandbox's hash, the sandbox its controlling owner (the pod keeps its own name)."""
    return {"labels": sandbox_labels(sandbox), "owner": sandbox}


@dataclass(frozen=True)
class Event:
    type: str
    object: Obj
    previous: Obj | None  # the object before this change, to see selector transitions
    version: int


def pod_object(
    name: str,
    ip: str | None,
    *,
    namespace: str = "default",
    labels: Mapping[str, str] | None = None,
    phase: str = "Running",
    ready: bool = True,
    deleting: bool = False,
    owner: str | None = None,
) -> Obj:
    """A Pod as the API serves it, with the fields the router reads; by default a warm
    pool's sandbox pod (the pool label and the sandbox label). `owner`: the Sandbox that
    controls it."""
    meta: Obj = {
        "name": name,
        "namespace": namespace,
        "uid": f"uid-{namespace}-{name}",
        "labels": {**POOL_LABELS, **sandbox_labels(name)} if labels is None else dict(labels),
    }
    if deleting:
        meta["deletionTimestamp"] = "2026-11-25T00:00:00Z"
    if owner is not None:
        meta["ownerReferences"] = [{
            "apiVersion": "agents.x-k8s.io/v1beta1", "kind": "Sandbox", "name": owner,
            "uid": f"uid-{namespace}-sandbox-{owner}", "controller": True,
            "blockOwnerDeletion": True,
        }]
    status: Obj = {
        "phase": phase,
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
    }
    if ip:
        status["podIP"] = ip
    return {"kind": "Pod", "apiVersion": "v1", "metadata": meta, "spec": {}, "status": status}


def _lookup(obj: Obj, path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part, "") if isinstance(value, dict) else ""
    return str(value)


_TERM = re.compile(
    r"\s*(?P<absent>!)?\s*(?P<key>[^\s!=(),]+)\s*"
    r"(?:(?P<op>==|=|!=)\s*(?P<value>[^\s,()]*)|(?P<set>in|notin)\s*\((?P<values>[^()]*)\))?"
    r"\s*(?:,|$)")


def _matches(selector: str, value_of: Any) -> bool:
    """The API server's selector forms: `k`, `!k`, `k=v`, `k==v`, `k!=v`, `k in (a,b)`,
    `k notin (a,b)`, comma-separated, all of them required."""
    position = 0
    while position < len(selector):
        term = _TERM.match(selector, position)
        if term is None or term.end() == position:
            raise ValueError(f"bad selector {selector!r}")
        position = term.end()
        value = value_of(term["key"])
        if term["absent"]:
            ok = value is None
        elif term["op"]:
            ok = (value != term["value"]) if term["op"] == "!=" else value == term["value"]
        elif term["set"]:
            allowed = {v.strip() for v in term["values"].split(",")}
            ok = value in allowed if term["set"] == "in" else value not in allowed
        else:
            ok = value is not None
        if not ok:
            return False
    return True


def selected(obj: Obj, query: Mapping[str, str]) -> bool:
    labels = obj["metadata"].get("labels") or {}
    return _matches(query.get("labelSelector", ""), labels.get) and _matches(
        query.get("fieldSelector", ""), lambda path: _lookup(obj, path)
    )


def status(code: int, reason: str, message: str) -> Obj:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


class FakeKube:
    """State and controls of the fake API; `start()` serves it on 127.0.0.1."""

    def __init__(self) -> None:
        self.version = 100
        self.objects: dict[tuple[str, str], Obj] = {}
        self.history: list[Event] = []
        self.compacted_below = 0
        self.calls: list[Call] = []
        self.tokens: dict[str, tuple[str, ...]] = {}
        self.reviews: list[Obj] = []  # the spec of each TokenReview received
        # Tokens an authenticator unaware of audiences accepts (a webhook's): authenticated
        # whatever the review asks, and answered with no `status.audiences`.
        self.audience_blind: set[str] = set()
        self.failure: int | None = None
        self.watch_failure: int | None = None  # watches only: lists still answer
        self.page_sizes: list[int] = []  # items in each list answer
        self._pages: dict[str, list[Obj]] = {}  # continue token -> its list's snapshot
        self.empty_watches = False  # watches answer 200 and end at once, with no event
        self.garbage = False
        self.hanging = 0
        self.released = threading.Event()
        self.released.set()
        self.hangs: Callable[[Call], bool] = lambda call: True  # which calls `hang` holds
        self._dropped = 0
        self._stopping = False
        self.changed = threading.Condition()
        self._server: ThreadingHTTPServer | None = None

    # Controls, for tests.

    def add_pod(self, name: str, ip: str | None, **fields: Any) -> None:
        self._record("ADDED", pod_object(name, ip, **fields))

    def add_pods(self, pods: list[P], **fields: Any) -> list[P]:
        """Each of `pods` (anything with `name` and `ip`) as a ready pool pod; returns them."""
        for pod in pods:
            self.add_pod(pod.name, pod.ip, **fields)
        return pods

    def update_pod(self, name: str, ip: str | None, **fields: Any) -> None:
        self._record("MODIFIED", pod_object(name, ip, **fields))

    def delete_pod(self, name: str, namespace: str = "default") -> None:
        with self.changed:
            obj = self.objects[(namespace, name)]
        self._record("DELETED", obj)

    def bookmark(self) -> None:
        """A BOOKMARK at a newer version, as after changes to objects no watch selects."""
        with self.changed:
            self.version += 10
            meta = {"resourceVersion": str(self.version)}
            self.history.append(Event("BOOKMARK", {"kind": "Pod", "metadata": meta}, None,
                                      self.version))
            self.changed.notify_all()

    def compact(self) -> None:
        """Forget history: a watch from any version seen so far gets 410 Gone."""
        with self.changed:
            self.compacted_below = self.version + 1

    def drop_watches(self) -> None:
        """Cut every open watch stream mid-way, as a restarting API server or LB does."""
        with self.changed:
            self._dropped += 1
            self.changed.notify_all()

    def fail_watches(self, code: int | None) -> None:
        """Answer every watch with `code` (a watch cache not ready, a front proxy that
        cannot stream, long-running requests throttled) while lists answer."""
        with self.changed:
            self.watch_failure = code
        if code is not None:
            self.drop_watches()

    def end_watches_at_once(self) -> None:
        """Every watch answers 200 and ends with no event (a proxy that does not stream,
        an API server closing watches as it shuts down)."""
        with self.changed:
            self.empty_watches = True
        self.drop_watches()

    def fail(self, code: int | None) -> None:
        """Answer every call with `code` (e.g. 503) until `fail(None)`."""
        with self.changed:
            self.failure = code
        if code is not None:
            self.drop_watches()

    @contextmanager
    def hang(self, only: Callable[[Call], bool] = lambda call: True) -> Iterator[None]:
        """Calls made inside the block (those `only` picks) hang until it ends."""
        self.hangs = only
        self.released.clear()
        self.drop_watches()
        try:
            yield
        finally:
            self.released.set()

    def count(self, verb: str, selector: str | None = None) -> int:
        """Calls of `verb` (with this label selector, if given)."""
        with self.changed:
            return sum(1 for call in self.calls if call.verb == verb and selector in (
                None, call.query.get("labelSelector")))

    def wait_for(self, predicate: Any, timeout: float = 10.0) -> None:
        """Block until `predicate()` holds, re-checked whenever a call arrives."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("fake Kubernetes API: condition not reached")
                self.changed.wait(left)

    def _record(self, kind: str, obj: Obj) -> None:
        with self.changed:
            self.version += 1
            key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
            previous = self.objects.get(key)
            obj = json.loads(json.dumps(obj))
            obj["metadata"]["resourceVersion"] = str(self.version)
            if kind == "DELETED":
                del self.objects[key]
            else:
                self.objects[key] = obj
            self.history.append(Event(kind, obj, previous, self.version))
            self.changed.notify_all()

    # Serving.

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeKube:
        fake = self

        class Handler(_Handler):
            kube = fake

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="fake-kube", daemon=True).start()
        return self

    def stop(self) -> None:
        with self.changed:
            self._stopping = True
            self.changed.notify_all()
        self.released.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def write_kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": TOKEN}}],
            "contexts": [{"name": "fake",
                          "context": {"cluster": "fake", "user": "fake", "namespace": namespace}}],
            "current-context": "fake",
        }
        path.write_text(json.dumps(config))
        return path

    # Answers, called from the handler threads.

    def review(self, spec: Obj) -> Obj:
        """A TokenReview's answer: authenticated when the token is known and, if the review
        names audiences, was minted for one of them (the API server's rule)."""
        with self.changed:
            self.reviews.append(spec)
            minted_for = self.tokens.get(spec.get("token", ""))
            blind = spec.get("token", "") in self.audience_blind
        asked = spec.get("audiences") or []
        authenticated = blind or minted_for is not None and (
            not asked or bool(set(asked) & set(minted_for)))
        status: Obj = {"authenticated": authenticated}
        if authenticated:
            status["user"] = {"username": "system:serviceaccount:default:agent"}
            if not blind:
                status["audiences"] = [a for a in asked if a in (minted_for or ())]
        return {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                "metadata": {}, "spec": spec, "status": status}

    def list_pods(self, namespace: str, query: Mapping[str, str]) -> Obj:
        """`namespace` "" lists every namespace. With `limit`, a page: `metadata.continue`
        then names the next, of the same snapshot (the list's resourceVersion), as the API
        server serves pages; `page_sizes` records how many items each answer held."""
        with self.changed:
            token = query.get("continue")
            if token:
                _, version, offset = (int(part) for part in token.split(":"))
                items = self._pages[token]
            else:
                version, offset = self.version, 0
                items = [obj for (ns, _), obj in sorted(self.objects.items())
                         if namespace in ("", ns) and selected(obj, query)]
            limit = int(query.get("limit") or 0) or len(items) - offset
            page = items[offset:offset + limit]
            metadata: Obj = {"resourceVersion": str(version)}
            if offset + limit < len(items):  # a token of this list's own: lists interleave
                metadata["continue"] = f"{len(self._pages)}:{version}:{offset + limit}"
                self._pages[metadata["continue"]] = items
            self.page_sizes.append(len(page))
            return {"kind": "PodList", "apiVersion": "v1", "metadata": metadata, "items": page}

    def watch_events(self, namespace: str, query: Mapping[str, str]) -> Iterator[Obj | None]:
        """Events after `resourceVersion` until `timeoutSeconds`; None means: cut the
        stream without ending it properly."""
        since = int(query.get("resourceVersion") or self.version)
        if since < self.compacted_below:
            yield {"type": "ERROR", "object": status(
                410, "Expired", f"too old resource version: {since} ({self.compacted_below})")}
            return
        deadline = time.monotonic() + float(query.get("timeoutSeconds") or 60)
        bookmarks = query.get("allowWatchBookmarks") == "true"
        with self.changed:
            dropped = self._dropped
            position = next((i for i, e in enumerate(self.history) if e.version > since),
                            len(self.history))
        while True:
            with self.changed:
                while (position == len(self.history) and dropped == self._dropped
                       and not self._stopping and time.monotonic() < deadline):
                    self.changed.wait(deadline - time.monotonic())
                if dropped != self._dropped or self._stopping:
                    yield None
                    return
                if position == len(self.history):
                    return
                event = self.history[position]
                position += 1
            if namespace and event.object["metadata"].get("namespace", namespace) != namespace:
                continue
            sent = _as_seen(event, query, bookmarks)
            if sent is not None:
                yield sent


def _as_seen(event: Event, query: Mapping[str, str], bookmarks: bool) -> Obj | None:
    """The event as a watch with this query sees it, or None if it sees nothing."""
    if event.type == "BOOKMARK":
        return {"type": "BOOKMARK", "object": event.object} if bookmarks else None
    was = event.previous is not None and selected(event.previous, query)
    now = event.type != "DELETED" and selected(event.object, query)
    if was and now:
        return {"type": "MODIFIED", "object": event.object}
    if now:
        return {"type": "ADDED", "object": event.object}
    if was:
        return {"type": "DELETED", "object": event.object}
    return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    kube: FakeKube

    def log_message(self, format: str, *args: Any) -> None:
        return None

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        parts = url.path.strip("/").split("/")
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._json(401, status(401, "Unauthorized", "Unauthorized"))
        if parts == ["api", "v1", "pods"]:
            namespace = ""
        elif len(parts) == 5 and parts[:3] == ["api", "v1", "namespaces"] and parts[4] == "pods":
            namespace = parts[3]
        else:
            return self._json(404, status(404, "NotFound", f"no route {url.path}"))
        watch = query.get("watch") in ("true", "1")
        kube = self.kube
        if not self._admit(Call("watch" if watch else "list", namespace, query)):
            return None
        if not watch:
            return self._json(200, kube.list_pods(namespace, query))
        self._stream(iter(()) if kube.empty_watches else kube.watch_events(namespace, query))

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._json(401, status(401, "Unauthorized", "Unauthorized"))
        if self.path.split("?")[0] != "/apis/authentication.k8s.io/v1/tokenreviews":
            return self._json(404, status(404, "NotFound", f"no route {self.path}"))
        token = (body.get("spec") or {}).get("token", "")
        if self._admit(Call("tokenreview", "", {"token": token})):
            self._json(201, self.kube.review(body.get("spec") or {}))

    def _admit(self, call: Call) -> bool:
        """Count the call, hold it while the fake hangs, and answer it here (False) while
        the fake fails or serves garbage."""
        kube = self.kube
        with kube.changed:
            kube.calls.append(call)
            kube.hanging += 1
            kube.changed.notify_all()
        if kube.hangs(call):
            kube.released.wait()
        with kube.changed:
            kube.hanging -= 1
            failure = kube.failure
            if failure is None and call.verb == "watch":
                failure = kube.watch_failure
        if failure is not None:
            self._json(failure, status(failure, "InternalError", "fake outage"))
            return False
        if kube.garbage:
            self._send(200, b"<html>not the API</html>")
            return False
        return True

    def _json(self, code: int, body: Obj) -> None:
        self._send(code, json.dumps(body).encode())

    def _send(self, code: int, data: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _stream(self, events: Iterator[Obj | None]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        for event in events:
            if event is None:
                self.close_connection = True
                self.connection.shutdown(2)
                return
            line = json.dumps(event).encode() + b"\n"
            self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()
