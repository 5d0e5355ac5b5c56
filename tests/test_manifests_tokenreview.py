"""The tokenreview component (`k8s/components/tokenreview/`), checked offline like the base
(`tests/test_manifests.py`): rendered over the base here, validated against the Kubernetes
schemas, and compared with `kubectl kustomize` of an overlay where kubectl exists."""

from __future__ import annotations

import shutil
from pathlib import Path

import kubernetes_validate
import pytest

from router import config
from tests import components
from tests.components import COMPONENTS, kubectl_build, only
from tests.test_manifests import KUBERNETES_VERSIONS, Manifest, kustomization

COMPONENT = COMPONENTS / "tokenreview"


def component() -> Manifest:
    return components.component("tokenreview")


def rendered() -> list[Manifest]:
    return components.rendered("tokenreview")


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
    # Without an audience every mounted ServiceAccount token would pass, a sandbox's too.
    assert options.authz_tokenreview_audiences == ("warmpool-router",)
    assert not options.static  # the same in-cluster API client reviews the tokens


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl to compare with")
def test_kubectl_builds_an_overlay_with_the_component(tmp_path: Path) -> None:
    objects = kubectl_build(tmp_path, "sandboxes", "tokenreview")
    binding = only(objects, "ClusterRoleBinding")
    assert binding["subjects"][0]["namespace"] == "sandboxes"  # follows the overlay
    assert "namespace" not in binding["metadata"]  # cluster-scoped
    container = only(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][-2:] == ["--authz-mode=tokenreview",
                                      "--authz-tokenreview-audiences=warmpool-router"]
