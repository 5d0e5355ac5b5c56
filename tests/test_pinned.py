"""Pinned routing: the agent-sandbox header contract, against real pods."""

from __future__ import annotations

import pytest

from router.config import cidrs
from router.pods import StaticPodSource
from tests.conftest import StartPods, StartRouter, static_config


def test_pinned_request_reaches_the_named_static_pod(
    start_pods: StartPods, start_router: StartRouter
):
    pods = start_pods(3)
    client = start_router(static_config(pods))
    for _ in range(5):
        response = client.get("/x", headers={"X-Sandbox-ID": "pod-2"})
        assert response.json()["pod"] == "pod-2"
    assert [p.app.hits for p in pods] == [0, 0, 5]


def test_pinned_busy_answer_is_relayed_not_retried(
    start_pods: StartPods, start_router: StartRouter
):
    pods = start_pods(2)
    pods[0].app.mode = "busy"
    client = start_router(static_config(pods))
    response = client.get("/", headers={"X-Sandbox-ID": "pod-0"})
    assert response.status_code == 503
    assert response.json() == {"detail": "busy"}
    assert [p.app.hits for p in pods] == [1, 0]


def test_pod_ip_header_targets_that_address(start_pods: StartPods, start_router: StartRouter):
    """For a sandbox the router does not know, inside --pod-cidr."""
    pods = start_pods(2)
    client = start_router(static_config(pods[:1], allow_loopback_pod_ip=True,
                                        pod_cidr=cidrs("127.0.0.0/8")))
    headers = {
        "X-Sandbox-ID": "elsewhere",
        "X-Sandbox-Pod-IP": pods[1].ip,
        "X-Sandbox-Port": str(pods[1].port),
    }
    assert client.get("/", headers=headers).json()["pod"] == "pod-1"


@pytest.mark.parametrize(("pod_cidr", "status"), [("127.0.0.0/8", 200), ("", 502)])
def test_unknown_sandbox_is_reached_by_its_cluster_dns_name_inside_pod_cidr(
    start_pods: StartPods, start_router: StartRouter, pod_cidr: str, status: int
):
    """A sandbox the router does not list (another namespace, say) is its DNS name, whose
    answer the router may connect to only inside --pod-cidr: without it, the router reaches
    the pods it knows and nothing else."""
    pods = start_pods(1)
    names = {"sb-1.team.svc.cluster.test": pods[0].ip}
    config = static_config([], cluster_domain="cluster.test", pod_port=pods[0].port,
                           allow_loopback_pod_ip=True,  # the answer is a loopback pod
                           pod_cidr=cidrs(pod_cidr))
    client = start_router(config, source=StaticPodSource([]), names=names)
    response = client.get("/", headers={"X-Sandbox-ID": "sb-1", "X-Sandbox-Namespace": "team"})
    assert response.status_code == status
    assert pods[0].app.hits == (status == 200)


def test_unresolvable_sandbox_answers_502(start_pods: StartPods, start_router: StartRouter):
    pods = start_pods(1)
    client = start_router(static_config(pods), names={})
    response = client.get("/", headers={"X-Sandbox-ID": "gone", "X-Sandbox-Namespace": "ns"})
    assert response.status_code == 502
    assert response.json() == {"detail": "Could not connect to the backend sandbox: gone"}
    assert pods[0].app.hits == 0


@pytest.mark.parametrize(
    ("headers", "detail"),
    [
        ({"X-Sandbox-ID": "bad.sandbox.id"}, "Invalid sandbox ID format."),
        ({"X-Sandbox-ID": "UPPER"}, "Invalid sandbox ID format."),
        ({"X-Sandbox-ID": "a" * 64}, "Invalid sandbox ID format."),
        ({"X-Sandbox-ID": "ok", "X-Sandbox-Namespace": "a_b"}, "Invalid namespace format."),
        ({"X-Sandbox-ID": "ok", "X-Sandbox-Port": "http"}, "Invalid port format."),
        ({"X-Sandbox-ID": "ok", "X-Sandbox-Port": "0"}, "Invalid port format."),
        ({"X-Sandbox-ID": "ok", "X-Sandbox-Port": "65536"}, "Invalid port format."),
        ({"X-Sandbox-ID": "ok", "X-Sandbox-Pod-IP": "10.20.30"},
         "Invalid target IP address format."),
        ({"X-Sandbox-ID": "ok", "X-Sandbox-Pod-IP": "169.254.169.254"},
         "Invalid target IP address."),
        ({"X-Sandbox-ID": "ok", "X-Sandbox-Pod-IP": "127.0.0.2"}, "Invalid target IP address."),
        ({"X-Sandbox-ID": "ok", "X-Sandbox-Pod-IP": "::1"}, "Invalid target IP address."),
        ({"X-Sandbox-ID": "ok", "X-Sandbox-Pod-IP": "224.0.0.1"}, "Invalid target IP address."),
        ({"X-Sandbox-ID": "ok", "X-Sandbox-Pod-IP": "0.0.0.0"}, "Invalid target IP address."),
    ],
)
def test_invalid_routing_headers_are_refused_before_any_pod(
    start_pods: StartPods, start_router: StartRouter, headers: dict[str, str], detail: str
):
    pods = start_pods(2)
    client = start_router(static_config(pods))
    response = client.post("/", headers=headers, content=b"payload")
    assert response.status_code == 400
    assert response.json() == {"detail": detail}
    assert sum(p.app.hits for p in pods) == 0


def test_pool_request_ignores_namespace_port_and_pod_ip(
    start_pods: StartPods, start_router: StartRouter
):
    pods = start_pods(2)
    client = start_router(static_config(pods))
    headers = {"X-Sandbox-Namespace": "x", "X-Sandbox-Port": "1", "X-Sandbox-Pod-IP": "10.0.0.1"}
    served = {client.get("/", headers=headers).json()["pod"] for _ in range(4)}
    assert served == {"pod-0", "pod-1"}


def test_sandbox_timeout_shortens_the_upstream_timeout(
    start_pods: StartPods, start_router: StartRouter
):
    pods = start_pods(1)
    client = start_router(static_config(pods, proxy_timeout=30))
    response = client.get(
        "/slow?seconds=2", headers={"X-Sandbox-ID": "pod-0", "X-Sandbox-Timeout": "0.5"}
    )
    assert response.status_code == 504
    assert response.json() == {"detail": "The backend sandbox did not answer in time."}


def test_invalid_sandbox_timeout_falls_back_to_the_proxy_timeout(
    start_pods: StartPods, start_router: StartRouter
):
    pods = start_pods(1)
    client = start_router(static_config(pods, proxy_timeout=30))
    response = client.get(
        "/slow?seconds=0.2", headers={"X-Sandbox-ID": "pod-0", "X-Sandbox-Timeout": "soon"}
    )
    assert response.status_code == 200
    assert response.text == "slow"
