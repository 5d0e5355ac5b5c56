"""Which name a listed pod answers to (router/sandbox_ids.py): the one whose hash its
sandbox label carries, its controlling Sandbox's or its own, as the agent-sandbox
controller's headless Service selects it."""

from __future__ import annotations

from typing import Any

import pytest

from router.sandbox_ids import SANDBOX_LABEL, fnv1a_32, sandbox_id


def owner(sandbox: str, **fields: Any) -> dict[str, Any]:
    return {"apiVersion": "agents.x-k8s.io/v1alpha1", "kind": "Sandbox", "name": sandbox,
            "uid": "u", "controller": True, **fields}


def meta(label: str | None, *owners: dict[str, Any]) -> dict[str, Any]:
    labels = {} if label is None else {SANDBOX_LABEL: fnv1a_32(label)}
    return {"name": "pool-x7k2p", "labels": labels, "ownerReferences": list(owners)}


@pytest.mark.parametrize(("metadata", "expected"), [
    # Adopted: the controller owns it and its label carries the sandbox's hash.
    (meta("my-sandbox", owner("my-sandbox")), "my-sandbox"),
    (meta("my-sandbox", {"kind": "ReplicaSet", "name": "r", "controller": False},
          owner("my-sandbox", apiVersion="agents.x-k8s.io/v1beta1")), "my-sandbox"),
    # A warm pod not claimed, or created for a sandbox of its own name.
    (meta("pool-x7k2p"), "pool-x7k2p"),
    (meta("pool-x7k2p", owner("pool-x7k2p")), "pool-x7k2p"),
    (meta(None), "pool-x7k2p"),  # a pool of plain pods
    (meta(None, owner("my-sandbox")), "pool-x7k2p"),
    # Adoption under way: the owner is set, the label still the pod's own.
    (meta("pool-x7k2p", owner("my-sandbox")), "pool-x7k2p"),
    # Owners that are not the Sandbox controlling the pod name nothing.
    (meta("my-sandbox", owner("my-sandbox", controller=False)), "pool-x7k2p"),
    (meta("my-sandbox", owner("my-sandbox", kind="SandboxWarmPool")), "pool-x7k2p"),
    (meta("my-sandbox", owner("my-sandbox", apiVersion="evil.example/v1")), "pool-x7k2p"),
    (meta("my-sandbox", owner("my-sandbox", apiVersion="agents.x-k8s.io.evil/v1")),
     "pool-x7k2p"),
    # Malformed metadata is no sandbox's.
    ({"name": "pool-x7k2p", "labels": {SANDBOX_LABEL: fnv1a_32("my-sandbox")},
      "ownerReferences": "my-sandbox"}, "pool-x7k2p"),
    ({"name": "pool-x7k2p", "labels": {SANDBOX_LABEL: fnv1a_32("my-sandbox")},
      "ownerReferences": [None, owner("my-sandbox", name=7)]}, "pool-x7k2p"),
    ({"name": "pool-x7k2p", "labels": ["my-sandbox"]}, "pool-x7k2p"),
    # An owner's name no request could send (the hash matching, as its author can make it):
    # it would reach the `X-Sandbox-ID` header of a pool answer.
    (meta("Bad\r\nX: 1", owner("Bad\r\nX: 1")), "pool-x7k2p"),
    (meta("-x", owner("-x")), "pool-x7k2p"),
    ({"name": "pool-x7k2p", "labels": {SANDBOX_LABEL: "00000000"},
      "ownerReferences": [owner("\ud800")]}, "pool-x7k2p"),  # JSON can spell it; no crash
])
def test_a_pod_answers_to_the_name_its_sandbox_label_carries(
        metadata: dict[str, Any], expected: str) -> None:
    assert sandbox_id(metadata, metadata["name"]) == expected
