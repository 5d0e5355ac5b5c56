"""What the proxy reports about each request, for metrics and access logs to subscribe to.

The proxy fills one `Exchange` per request and hands it over when the request ends; it
never formats a log line or touches a metric itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

Route = Literal["pool", "pinned"]
Outcome = Literal["ok", "busy", "connect_error", "timeout", "error"]
Refresh = Literal["ok", "error"]


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


class Observer(Protocol):
    def request_started(self, route: Route) -> None: ...

    def attempt(self, outcome: Outcome) -> None: ...

    def request_finished(self, exchange: Exchange) -> None: ...

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

    def pod_list_refreshed(self, outcome: Refresh) -> None:
        return None
