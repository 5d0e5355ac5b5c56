"""Which `X-Sandbox-ID` reaches a pod listed by the Kubernetes API: the agent-sandbox
controller's naming, read from the pod itself.

A sandbox's pod is not always named after the sandbox: a sandbox that adopted a warm-pool
pod runs in a pod named by the pool (`pool-x7k2p` serving sandbox `my-sandbox`). What ties
them is the label the controller stamps on the pod, `agents.x-k8s.io/sandbox-name-hash`,
the FNV-1a hash of the sandbox's name, which is also the selector of the sandbox's
headless Service, so the DNS name `<sandbox>.<namespace>.svc` that the agent-sandbox
routers connect to resolves to exactly the pods carrying that hash. The router finds a
sandbox in its index by the same rule: a pod answers to the name whose hash its label
carries: its controlling Sandbox's (the owner the controller sets when it creates or
adopts the pod) when the label carries that name's hash, else its own. Keyed by the pod's
own name alone, the index sent the requests of sandbox `my-sandbox` to DNS and those of a
sandbox named `pool-x7k2p` to the pod of `my-sandbox`. A name two pods answer to is
indexed for neither (`router.pods.Snapshot`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

SANDBOX_LABEL = "agents.x-k8s.io/sandbox-name-hash"
"""The label the agent-sandbox controller stamps on every sandbox's pod (the FNV-1a hash of
the sandbox name), claimed or not, pooled or not: the sandbox index selects on it."""

SANDBOX_GROUP = "agents.x-k8s.io/"
"""The API group (with the slash before its version) of the Sandbox kind."""

_DNS_LABEL = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?")


def is_dns_label(text: str) -> bool:
    """RFC 1123 label: what `X-Sandbox-ID` and `X-Sandbox-Namespace` must be."""
    return _DNS_LABEL.fullmatch(text) is not None


def fnv1a_32(text: str) -> str:
    """FNV-1a 32-bit of `text` as 8 hex digits: the agent-sandbox controller's name hash,
    in the sandbox label and in the label of a SandboxWarmPool's pods."""
    value = 0x811C9DC5
    for byte in text.encode():
        value = ((value ^ byte) * 0x01000193) & 0xFFFFFFFF
    return f"{value:08x}"


def sandbox_id(meta: Mapping[str, Any], name: str) -> str:
    """The sandbox name the pod `name` answers to (see the module docstring): its
    controlling Sandbox's when its sandbox label carries that name's hash, else `name`
    (a pool of plain pods, a warm pod not yet claimed). An owner's name is whatever the
    pod's creator wrote: one no request could name (not a DNS label) is not taken, so it
    never reaches a header of an answer."""
    labels = meta.get("labels")
    label = labels.get(SANDBOX_LABEL) if isinstance(labels, Mapping) else None
    owner = _controlling_sandbox(meta) if label is not None else None
    if owner is not None and is_dns_label(owner) and fnv1a_32(owner) == label:
        return owner
    return name


def _controlling_sandbox(meta: Mapping[str, Any]) -> str | None:
    """The name of the Sandbox that controls the pod (its owner reference marked
    `controller`), if one does."""
    owners = meta.get("ownerReferences")
    for owner in owners if isinstance(owners, list) else ():
        if (isinstance(owner, Mapping) and owner.get("controller") is True
                and owner.get("kind") == "Sandbox"
                and str(owner.get("apiVersion", "")).startswith(SANDBOX_GROUP)):
            name = owner.get("name")
            return name if isinstance(name, str) else None
    return None
