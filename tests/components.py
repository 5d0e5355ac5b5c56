"""The kustomize components of `k8s/components/`, rendered over the base offline (the
base as `tests/test_manifests.py` renders it) and, where kubectl exists, built by it."""

from __future__ import annotations

import copy
import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.test_manifests import K8S, Manifest, kustomization, render

COMPONENTS = K8S / "components"
# The kinds the components add that live in a namespace (the overlay's, as kustomize sets).
NAMESPACED = {"Service", "NetworkPolicy", "HorizontalPodAutoscaler"}


def component(name: str) -> Manifest:
    loaded: Manifest = yaml.safe_load((COMPONENTS / name / "kustomization.yaml").read_text())
    return loaded


def _append(document: Any, path: str, value: Any) -> None:
    """JSON patch `add` at `path`, for the paths the components use (`.../-` appends)."""
    *parents, last = path.strip("/").split("/")
    for part in parents:
        document = document[int(part)] if isinstance(document, list) else document[part]
    if last == "-":
        document.append(value)
    else:
        document[last] = value


def rendered(*names: str) -> list[Manifest]:
    """The base with the components, as an overlay naming the base's namespace builds it
    (only the fields `component()` files use: resources, and `add` patches)."""
    objects = render()
    namespace = kustomization()["namespace"]
    for name in names:
        for resource in component(name).get("resources", []):
            for doc in yaml.safe_load_all((COMPONENTS / name / resource).read_text()):
                for subject in doc.get("subjects", []):
                    subject["namespace"] = namespace
                if doc["kind"] in NAMESPACED:
                    doc["metadata"]["namespace"] = namespace
                objects.append(doc)
        for patch in component(name).get("patches", []):
            target = patch["target"]
            for obj in objects:
                if (obj["kind"], obj["metadata"]["name"]) == (target["kind"], target["name"]):
                    for op in yaml.safe_load(patch["patch"]):
                        assert op["op"] == "add"
                        _append(obj, op["path"], copy.deepcopy(op["value"]))
    return objects


def only(objects: list[Manifest], kind: str, name: str | None = None) -> Manifest:
    matches = [obj for obj in objects
               if obj["kind"] == kind and name in (None, obj["metadata"]["name"])]
    assert len(matches) == 1, f"expected one {kind}, found {len(matches)}"
    return matches[0]


def kubectl_build(directory: Path, namespace: str, *names: str) -> list[Manifest]:
    """`kubectl kustomize` of an overlay in `directory`: the base, `namespace`, and the
    components."""
    overlay = directory / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "namespace": namespace,
        "resources": [os.path.relpath(K8S, overlay)],
        "components": [os.path.relpath(COMPONENTS / name, overlay) for name in names],
    }))
    built = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True,
                           text=True, timeout=30, check=False)
    assert built.returncode == 0, built.stderr
    return [doc for doc in yaml.safe_load_all(built.stdout) if doc]
