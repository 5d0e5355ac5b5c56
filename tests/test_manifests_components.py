"""The components for pinned routing and for running beside the agent-sandbox routers
(`k8s/components/`: sandbox-router-svc, all-namespaces, network-policy, hpa), checked
offline like the base: rendered over it, validated against the Kubernetes schemas, their
rules asserted, and compared with `kubectl kustomize` where kubectl exists."""

from __future__ import annotations

import shutil
from pathlib import Path

import kubernetes_validate
import pytest

from router import config
from router.config import DEFAULT_SELECTOR
from router.sandbox_ids import SANDBOX_LABEL
from tests.components import COMPONENTS, component, kubectl_build, only, rendered
from tests.test_manifests import KUBERNETES_VERSIONS, Manifest, kustomization

NAMES = ("sandbox-router-svc", "all-namespaces", "network-policy", "hpa")


def container(objects: list[Manifest]) -> Manifest:
    spec = only(objects, "Deployment")["spec"]["template"]["spec"]
    first: Manifest = spec["containers"][0]
    return first


def port_of(name: str, objects: list[Manifest]) -> int:
    return next(p["containerPort"] for p in container(objects)["ports"] if p["name"] == name)


@pytest.mark.parametrize("name", NAMES)
def test_each_component_uses_only_what_the_renderer_applies(name: str) -> None:
    spec = component(name)
    assert spec["kind"] == "Component"
    assert set(spec) <= {"apiVersion", "kind", "resources", "patches"}
    assert sorted(spec["resources"]) == sorted(
        path.name for path in (COMPONENTS / name).glob("*.yaml")
        if path.name != "kustomization.yaml")


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_all_components_validate_against_the_kubernetes_schema(version: str) -> None:
    for obj in rendered(*NAMES):
        kubernetes_validate.validate(obj, version, strict=True)


def test_the_sdk_finds_the_router_as_sandbox_router_svc_on_8080() -> None:
    objects = rendered("sandbox-router-svc")
    service = only(objects, "Service", "sandbox-router-svc")
    deployment = only(objects, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert port["port"] == 8080
    assert port["targetPort"] == "http" and port_of("http", objects) == 8080
    assert config.load(container(objects)["args"], env={}).port == 8080


def test_all_namespaces_reads_pods_cluster_wide_and_nothing_more() -> None:
    objects = rendered("all-namespaces")
    role = only(objects, "ClusterRole")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"],
                              "verbs": ["get", "list", "watch"]}]
    binding = only(objects, "ClusterRoleBinding")
    account = only(objects, "ServiceAccount")["metadata"]["name"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account, "namespace": kustomization()["namespace"]}]
    options = config.load(container(objects)["args"], env={})
    assert options.all_namespaces and not options.static


def test_the_network_policy_opens_the_two_ports_and_reaches_sandboxes_dns_and_the_api(
) -> None:
    objects = rendered("network-policy")
    policy = only(objects, "NetworkPolicy")["spec"]
    labels = only(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    (ingress,) = policy["ingress"]
    assert {(p["port"], p["protocol"]) for p in ingress["ports"]} == {("http", "TCP"),
                                                                       ("metrics", "TCP")}
    args = config.load(container(objects)["args"], env={})
    sandboxes, dns, api = policy["egress"]
    keys = {expr["key"] for peer in sandboxes["to"]
            for expr in peer["podSelector"]["matchExpressions"] if expr["operator"] == "Exists"}
    assert keys == {SANDBOX_LABEL, DEFAULT_SELECTOR}
    assert all(peer["namespaceSelector"] == {} for peer in sandboxes["to"])
    assert [p["port"] for p in sandboxes["ports"]] == [args.pod_port]
    assert {(p["port"], p["protocol"]) for p in dns["ports"]} == {(53, "UDP"), (53, "TCP")}
    assert {p["port"] for p in api["ports"]} == {443, 6443} and "to" not in api


def test_the_autoscaler_scales_the_deployment_on_cpu_requests() -> None:
    objects = rendered("hpa")
    hpa = only(objects, "HorizontalPodAutoscaler")["spec"]
    deployment = only(objects, "Deployment")
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": deployment["metadata"]["name"]}
    (metric,) = hpa["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert "cpu" in container(objects)["resources"]["requests"]  # utilisation needs it
    budget = only(objects, "PodDisruptionBudget")["spec"]["minAvailable"]
    assert budget < hpa["minReplicas"] <= hpa["maxReplicas"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl to compare with")
def test_kubectl_builds_the_sdk_overlay(tmp_path: Path) -> None:
    """The overlay docs/kubernetes.md shows: the router in the SDK's router namespace."""
    objects = kubectl_build(tmp_path, "agent-sandbox-system", *NAMES)
    assert {obj["kind"] for obj in objects} >= {"ClusterRole", "NetworkPolicy",
                                                "HorizontalPodAutoscaler"}
    service = only(objects, "Service", "sandbox-router-svc")
    assert service["metadata"]["namespace"] == "agent-sandbox-system"
    binding = only(objects, "ClusterRoleBinding")
    assert binding["subjects"][0]["namespace"] == "agent-sandbox-system"
    assert container(objects)["args"][-1] == "--all-namespaces"
    offline = rendered(*NAMES)
    assert sorted((o["kind"], o["metadata"]["name"]) for o in objects) == sorted(
        (o["kind"], o["metadata"]["name"]) for o in offline)
