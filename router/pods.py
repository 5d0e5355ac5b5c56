"""The `Pod` value, the immutable `Snapshot` the request path reads, and the static source.

A pod source owns its refresh machinery (a background thread for Kubernetes, nothing for a
static list) and hands the request path whole snapshots: the proxy never waits on a source
and never sees a list being edited.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple, Protocol


class Pod(NamedTuple):
    """One sandbox server the router can send requests to. A tuple rather than a frozen
    dataclass: the balancer and passive health key their state by pod, about ten look-ups
    per pool request, and a tuple's hash is computed in C where the dataclass ran a
    Python `__hash__` building a tuple each time (#13)."""

    name: str
    namespace: str
    ip: str
    port: int
    sandbox: str = ""
    """The sandbox this pod serves, when that is not the pod's own name (a sandbox that
    adopted a warm-pool pod: router/sandbox_ids.py)."""

    @property
    def sandbox_id(self) -> str:
        """The `X-Sandbox-ID` that reaches this pod: its sandbox's name, else its own."""
        return self.sandbox or self.name


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The pods one request routes over: the pool (`pods`), sorted by name so round robin
    stays fair when the list is rebuilt, and the sandbox index (`by_name`) pinned requests
    look up by (namespace, `X-Sandbox-ID`), each pod under its `sandbox_id`: every pool
    pod, plus the `sandboxes` outside the pool (claimed ones, ones created without a pool,
    other namespaces). `listed`: all of them, the pods the router knows (their addresses
    are taken: router/targets.py).

    A name that two pods answer to (`shared`) is left out of the index: anyone who may
    create pods in a watched namespace can give one a sandbox's label and owner, and
    which of two pods came last in a list or a watch is no ground to choose. A pinned
    request for it goes to its DNS name, as through the agent-sandbox routers (whose
    Service selects by the label, so the DNS answer may be either pod: the index does not
    choose, it does not make the name safer than DNS). A pod met twice (in the pool and
    the index) is one pod; the pool's entry is kept."""

    pods: tuple[Pod, ...]
    by_name: Mapping[tuple[str, str], Pod]
    listed: tuple[Pod, ...]
    shared: frozenset[tuple[str, str]]

    @classmethod
    def of(cls, pods: Iterable[Pod], sandboxes: Iterable[Pod] = ()) -> Snapshot:
        ordered = tuple(sorted(pods, key=lambda pod: (pod.namespace, pod.name)))
        listed = (*ordered, *sandboxes)
        by_name: dict[tuple[str, str], Pod] = {}
        shared = set()
        for pod in listed:
            key = (pod.namespace, pod.sandbox_id)
            other = by_name.setdefault(key, pod)
            if other.name != pod.name:
                shared.add(key)
        for key in shared:
            del by_name[key]
        return cls(pods=ordered, by_name=by_name, listed=listed, shared=frozenset(shared))


class PodSource(Protocol):
    """Where the pool comes from. `snapshot` is read on every request and must not block.

    `operator_chosen`: whether the pods are the operator's own choice (`--pods`, `--demo`),
    whose host and port are then allowed whatever they are, or data a cluster user controls
    (the Kubernetes API), which go through the address policy (router/targets.py)."""

    operator_chosen: bool

    def snapshot(self) -> Snapshot | None:
        """The current pods, or None before the first successful sync."""
        ...

    def not_ready_reason(self) -> str | None:
        """Why `/ready` must fail now (never synced, too stale), or None when fine."""
        ...

    def age(self) -> float | None:
        """Seconds since the list was last confirmed; None before the first sync."""
        ...

    def last_error(self) -> str | None:
        """Why the source last failed to refresh, while it serves its last good list
        (stale); None while the list is fresh."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class StaticPodSource:
    """A fixed pool (`--pods`, `--demo`, sidecar use): always synced, never stale."""

    operator_chosen = True

    def __init__(self, pods: Iterable[Pod]) -> None:
        self._snapshot = Snapshot.of(pods)

    def snapshot(self) -> Snapshot:
        return self._snapshot

    def not_ready_reason(self) -> str | None:
        return None

    def age(self) -> float | None:
        return 0.0

    def last_error(self) -> str | None:
        return None

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None
