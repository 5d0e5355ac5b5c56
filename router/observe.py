"""What the proxy reports about each request, for metrics and access logs to subscribe to.

The proxy fills one `Exchange` per request and hands it over when the request ends; it
never formats a log line or touches a metric itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

Route = Literal["pool", "pinned"]
Outcome = Literal["ok", "busy", "connect_error", "timeout", "error"]
Refresh = Literal["ok", "error"]
# Why a pod cools down (router/health.py): it answered 503, or it refused or failed.
Cause = Literal["busy", "failed"]
Decision = Literal["allow", "deny"]


@dataclass(slots=True)
class Exchange:
    """One proxied request, as it went."""

    method: str
    path: str
    client: str | None
    request_id: str
    route: Route
    started: float
    status: int = 0
    pod: str | None = None
    namespace: str | None = None
    attempts: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    duration: float = 0.0
    authz: Decision | None = None  # None: no authorizer was asked (allow-all)


class Observer(Protocol):
    def request_started(self, route: Route) -> None: ...

    def attempt(self, outcome: Outcome) -> None: ...

    def request_finished(self, exchange: Exchange) -> None: ...

    def pod_skipped(self, cause: Cause) -> None:
        """A pool request put a cooling-down pod behind every other pod."""
        ...

    def upgraded(self, exchange: Exchange) -> None:
        """The pod's 101 reached the client: the request is now a tunnel, and
        `request_finished` comes when it ends (status 101, its whole life)."""
        ...

    def pod_list_refreshed(self, outcome: Refresh) -> None:
        """Called by a pod source (from its own thread) after each API list or watch."""
        ...


class NullObserver:
    """Reports nowhere: the default when metrics and access logs are off."""

    def request_started(self, route: Route) -> None:
        return None

    def attempt(self, outcome: Outcome) -> None:
        return None

    def request_finished(self, exchange: Exchange) -> None:
        return None

    def pod_skipped(self, cause: Cause) -> None:
        return None

    def upgraded(self, exchange: Exchange) -> None:
        return None

    def pod_list_refreshed(self, outcome: Refresh) -> None:
        return None


class Observers:
    """Several observers as one, so the proxy makes one call per event whatever is on."""

    def __init__(self, observers: Sequence[Observer]) -> None:
        self._observers = tuple(observers)

    def request_started(self, route: Route) -> None:
        for observer in self._observers:
            observer.request_started(route)

    def attempt(self, outcome: Outcome) -> None:
        for observer in self._observers:
            observer.attempt(outcome)

    def request_finished(self, exchange: Exchange) -> None:
        for observer in self._observers:
            observer.request_finished(exchange)

    def pod_skipped(self, cause: Cause) -> None:
        for observer in self._observers:
            observer.pod_skipped(cause)

    def upgraded(self, exchange: Exchange) -> None:
        for observer in self._observers:
            observer.upgraded(exchange)

    def pod_list_refreshed(self, outcome: Refresh) -> None:
        for observer in self._observers:
            observer.pod_list_refreshed(outcome)


def combine(*observers: Observer | None) -> Observer:
    """The observers that are on, as one; `NullObserver` when none is."""
    present = [observer for observer in observers if observer is not None]
    if not present:
        return NullObserver()
    return present[0] if len(present) == 1 else Observers(present)
