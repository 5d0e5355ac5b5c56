"""One typed error carrying status and detail, turned into a response in one place."""

from __future__ import annotations

import json

from router.asgi import Send

JSON_HEADERS = ((b"content-type", b"application/json"),)


class ProxyError(Exception):
    """A failure the client is told about as `{"detail": ...}` with `status`."""

    def __init__(
        self, status: int, detail: str, headers: tuple[tuple[bytes, bytes], ...] = ()
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers


class ConnectFailed(ProxyError):
    """Nothing reached the pod (refused, unreachable, connect timeout): safe to try the next."""

    def __init__(self, detail: str = "Could not connect to the backend sandbox.") -> None:
        super().__init__(502, detail)


class TargetRefused(ConnectFailed):
    """The address policy (`router/targets.py`) refused the address: nothing was connected.
    The detail names no address, so a caller cannot use it to read the cluster's DNS."""

    def __init__(self) -> None:
        super().__init__("The backend sandbox address is not allowed.")


class UpstreamTimeout(ProxyError):
    def __init__(self, detail: str = "The backend sandbox did not answer in time.") -> None:
        super().__init__(504, detail)


class UpstreamFailed(ProxyError):
    """The request reached the pod and then failed: final, since a replay could repeat it."""

    def __init__(self, detail: str = "The backend sandbox connection failed.") -> None:
        super().__init__(502, detail)


def busy() -> ProxyError:
    return ProxyError(503, "All warm pool pods are busy.", ((b"retry-after", b"1"),))


def no_pods() -> ProxyError:
    return ProxyError(503, "No warm pool pods are available.", ((b"retry-after", b"1"),))


async def send_json(
    send: Send, status: int, payload: object, headers: tuple[tuple[bytes, bytes], ...] = ()
) -> int:
    """Send a whole JSON response; returns the body size for the access log."""
    body = json.dumps(payload, separators=(",", ":")).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                *JSON_HEADERS,
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
    return len(body)


async def send_error(
    send: Send, error: ProxyError, headers: tuple[tuple[bytes, bytes], ...] = ()
) -> int:
    return await send_json(send, error.status, {"detail": error.detail}, (*error.headers, *headers))
