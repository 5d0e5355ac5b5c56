"""The tokenreview component (`k8s/components/tokenreview/`), checked offline like the base
(`tests/test_manifests.py`): rendered over the base here, validated against the Kubernetes
schemas, and compared with `kubectl kustomize` of an overlay where kubectl exists."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from router import config
from tests.test_manifests import K8S, KUBERNETES_VERSIONS, Manifest, kustomization, render

COMPONENT = K8S / "components" / "tokenreview"


def component() -> Manifest:
    loaded: Manifest = yaml.safe_load((COMPONENT / "kustomization.yaml").read_text())
    return loaded


def _append(document: Any, path: str, value: Any) -> None:
    """JSON patch `add` at `path`, for the paths the component uses (`.../-` appends)."""
    *parents, last = path.strip("/").split("/")
    for part in parents:
        document = document[int(part)] if isinstance(document, list) else document[part]
    if last == "-":
        document.append(value)
    else:
        document[last] = value


def rendered() -> list[Manifest]:
    """The base with the component, as an overlay naming the base's namespace builds it."""
    objects = render()
    for name in component()["resources"]:
        for doc in yaml.safe_load_all((COMPONENT / name).read_text()):
            for subject in doc.get("subjects", []):
                subject["namespace"] = kustomization()["namespace"]
            objects.append(doc)
    for patch in component()["patches"]:
        target = patch["target"]
        for obj in objects:
            if (obj["kind"], obj["metadata"]["name"]) == (target["kind"], target["name"]):
                for op in yaml.safe_load(patch["patch"]):
                    assert op["op"] == "add"
                    _append(obj, op["path"], copy.deepcopy(op["value"]))
    return objects


def only(objects: list[Manifest], kind: str) -> Manifest:
    matches = [obj for obj in objects if obj["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind}, found {len(matches)}"
    return matches[0]


def test_component_uses_only_what_this_test_renders() -> None:
    assert component()["kind"] == "Component"
    assert set(component()) <= {"apiVersion", "kind", "resources", "patches"}
    assert sorted(component()["resources"]) == sorted(
        path.name for path in COMPONENT.glob("*.yaml") if path.name != "kustomization.yaml")


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_component_objects_validate_against_the_kubernetes_schema(version: str) -> None:
    for obj in rendered():
        kubernetes_validate.validate(obj, version, strict=True)


def test_the_service_account_may_create_token_reviews_and_nothing_more() -> None:
    objects = rendered()
    binding = only(objects, "ClusterRoleBinding")
    account = only(objects, "ServiceAccount")["metadata"]["name"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io",
                                  "kind": "ClusterRole", "name": "system:auth-delegator"}
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account, "namespace": kustomization()["namespace"]}]
    assert not [obj for obj in objects if obj["kind"] == "ClusterRole"]  # the stock one


def test_the_deployment_runs_the_router_in_tokenreview_mode() -> None:
    container = only(rendered(), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    options = config.load(container["args"], env={})
    assert options.authz_mode == "tokenreview"
    assert not options.static  # the same in-cluster API client reviews the tokens


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl to compare with")
def test_kubectl_builds_an_overlay_with_the_component(tmp_path: Path) -> None:
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "namespace": "sandboxes",
        "resources": [os.path.relpath(K8S, overlay)],
        "components": [os.path.relpath(COMPONENT, overlay)],
    }))
    built = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True,
                           text=True, timeout=30, check=False)
    assert built.returncode == 0, built.stderr
    objects = [doc for doc in yaml.safe_load_all(built.stdout) if doc]
    binding = only(objects, "ClusterRoleBinding")
    assert binding["subjects"][0]["namespace"] == "sandboxes"  # follows the overlay
    assert "namespace" not in binding["metadata"]  # cluster-scoped
    container = only(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][-1] == "--authz-mode=tokenreview"
