"""The published agent-sandbox SDK (`k8s-agent-sandbox`) through the router, with no
cluster: its direct mode (`SandboxDirectConnectionConfig(api_url=...)`, what the gateway
mode does once it has the gateway's address) sends every request to the router with
`X-Sandbox-ID`/`-Namespace`/`-Port`, and `X-Sandbox-Pod-IP` only when it can read the
Sandbox's status from the API itself. Here its API is the fake one, which has no Sandbox
resource: so no Pod-IP header, and the claimed sandbox is found by the index alone, by
its own name, although its pod kept the warm pool's."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from k8s_agent_sandbox.k8s_helper import K8sHelper
from k8s_agent_sandbox.models import SandboxDirectConnectionConfig
from k8s_agent_sandbox.sandbox import Sandbox
from kubernetes import config as kubeconfig

from tests.conftest import StartPods, eventually
from tests.fake_kube import FakeKube, adopted_by
from tests.kube_router import pool_names


def test_the_sdk_reaches_a_sandbox_that_adopted_a_warm_pod_without_a_pod_ip(
    kube: FakeKube, kube_router: Any, start_pods: StartPods, tmp_path: Path
) -> None:
    warm, claimed = start_pods(2)
    kube.add_pods([warm, claimed])
    client = kube_router([warm, claimed])
    kube.update_pod(claimed.name, claimed.ip, **adopted_by("claim-1"))  # the pod keeps its name
    eventually(lambda: pool_names(client) == {warm.name})

    api = kubeconfig.new_client_from_config(str(kube.write_kubeconfig(tmp_path / "sdk")))
    sandbox = Sandbox(
        claim_name="claim-1",
        sandbox_id="claim-1",
        namespace="default",
        connection_config=SandboxDirectConnectionConfig(api_url=str(client.base_url),
                                                        server_port=claimed.port),
        k8s_helper=K8sHelper(api),
    )
    sent: list[Mapping[str, str]] = []  # the headers of each request the SDK sent
    sandbox.connector.session.hooks["response"].append(
        lambda response, **_: sent.append(dict(response.request.headers)))
    try:
        assert sandbox.get_pod_ip() is None  # what the SDK would send as X-Sandbox-Pod-IP
        for _ in range(3):
            answer = sandbox.files.read("notes.txt")
            assert b'"pod": "%s"' % claimed.name.encode() in answer
    finally:
        sandbox.connector.close()
        api.close()

    assert warm.app.hits == 0
    seen = claimed.app.seen
    assert len(seen) == 3
    assert {s.raw_path for s in seen} == {b"/download/notes.txt"}
    assert len(sent) == 3
    for headers in sent:
        assert headers["X-Sandbox-ID"] == "claim-1"
        assert headers["X-Sandbox-Namespace"] == "default"
        assert headers["X-Sandbox-Port"] == str(claimed.port)
        assert "X-Sandbox-Pod-IP" not in headers
