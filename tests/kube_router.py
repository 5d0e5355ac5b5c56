"""What the tests of the pod source ask of a router over the fake Kubernetes API (the
`kube_router` fixture of tests/conftest.py starts one)."""

from __future__ import annotations

import collections

import httpx


def ready(client: httpx.Client) -> bool:
    return client.get("/ready").status_code == 200


def served_by(client: httpx.Client, count: int) -> collections.Counter[str]:
    answers = (client.get("/") for _ in range(count))
    return collections.Counter(a.headers["x-sandbox-id"] for a in answers if a.status_code == 200)


def pool_names(client: httpx.Client) -> set[str]:
    snapshot = client.app.source.snapshot()  # type: ignore[attr-defined]
    return {pod.name for pod in snapshot.pods} if snapshot else set()
