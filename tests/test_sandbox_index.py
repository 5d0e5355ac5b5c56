"""The sandbox index next to the pool, end to end: the router watches a fake API server
and pinned requests reach sandboxes by name with no DNS (every router here resolves no
name at all), whether they were claimed out of the pool, never in one, or live in another
namespace; the pool stays the warm-pool-labelled pods of `--namespace`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import httpx
import pytest

from router import config
from router.config import DEFAULT_SELECTOR, cidrs
from router.sandbox_ids import SANDBOX_LABEL
from tests.conftest import StartPods, eventually
from tests.fake_kube import POOL_LABELS, FakeKube, adopted_by, sandbox_labels
from tests.index_memory import measure
from tests.kube_router import pool_names, served_by
from tests.process import run_router


def pinned(client: httpx.Client, name: str, namespace: str = "default",
           **headers: str) -> httpx.Response:
    return client.get("/", headers={"X-Sandbox-ID": name, "X-Sandbox-Namespace": namespace,
                                    **headers})


def test_a_claimed_pod_leaves_the_rotation_and_is_still_reached_by_name(
    kube: FakeKube, kube_router: Any, start_pods: StartPods
) -> None:
    pods = kube.add_pods(start_pods(3))
    client = kube_router(pods)
    assert pool_names(client) == {"pod-0", "pod-1", "pod-2"}

    # The claim controller removes the warm-pool label and keeps the sandbox label.
    kube.update_pod("pod-1", pods[1].ip, labels=sandbox_labels("pod-1"))
    eventually(lambda: pool_names(client) == {"pod-0", "pod-2"})

    assert served_by(client, 20) == {"pod-0": 10, "pod-2": 10}
    for _ in range(3):
        answer = pinned(client, "pod-1")
        assert answer.status_code == 200 and answer.json()["pod"] == "pod-1"
    assert [pod.app.hits for pod in pods] == [10, 3, 10]

    kube.delete_pod("pod-1")  # the sandbox is gone: no index entry, no DNS name
    eventually(lambda: pinned(client, "pod-1").status_code == 502)
    hits = pods[1].app.hits  # the polls before the deletion arrived reached it
    assert pinned(client, "pod-1").status_code == 502
    assert pods[1].app.hits == hits


def test_a_sandbox_that_adopted_a_warm_pod_is_reached_by_its_own_name(
    kube: FakeKube, kube_router: Any, start_pods: StartPods
) -> None:
    """The SDK names the sandbox (`my-sandbox`), whose pod keeps the pool's name (`pod-1`):
    the request goes to that pod, with no DNS (these routers resolve nothing). The pod's
    own name is no sandbox's: a request for it is not sent there."""
    pods = kube.add_pods(start_pods(3))
    client = kube_router(pods)

    kube.update_pod("pod-1", pods[1].ip, **adopted_by("my-sandbox"))
    eventually(lambda: pool_names(client) == {"pod-0", "pod-2"})
    eventually(lambda: pinned(client, "my-sandbox").status_code == 200)
    for _ in range(3):
        assert pinned(client, "my-sandbox").json()["pod"] == "pod-1"
    hits = pods[1].app.hits

    assert pinned(client, "pod-1").status_code == 502
    assert pods[1].app.hits == hits


def test_a_sandbox_named_like_another_sandboxs_pod_reaches_only_its_own_pod(
    kube: FakeKube, kube_router: Any, start_pods: StartPods
) -> None:
    """Sandbox `victim` adopted warm pod `pod-0`; a sandbox named `pod-0` adopted `pod-1`.
    Requests for `pod-0` go to that sandbox's pod, as its DNS name would take them, never
    to the pod of `victim` that happens to bear the name."""
    first, second = start_pods(2)
    kube.add_pod(first.name, first.ip, **adopted_by("victim"))
    kube.add_pod(second.name, second.ip, **adopted_by(first.name))
    client = kube_router([first, second])

    eventually(lambda: pinned(client, "victim").status_code == 200)
    assert [pinned(client, first.name).json()["pod"] for _ in range(3)] == [second.name] * 3
    assert pinned(client, "victim").json()["pod"] == first.name
    assert (first.app.hits, second.app.hits) == (2, 3)


def listed(client: httpx.Client) -> set[str]:
    snapshot = client.app.source.snapshot()  # type: ignore[attr-defined]
    return {pod.name for pod in snapshot.listed} if snapshot else set()


def test_a_name_two_pods_answer_to_reaches_neither(
    kube: FakeKube, kube_router: Any, start_pods: StartPods, caplog: pytest.LogCaptureFixture
) -> None:
    """A second pod given sandbox `victim`'s label and owner (anyone who may create pods in
    the namespace can) takes none of its requests, whichever came last; nor does the
    first, since the router cannot tell which is the sandbox's: the name is left to DNS
    (none here: 502). Both addresses stay known: no hint for another name reaches them.
    One warning says so, not one per change of the index while it lasts."""
    caplog.set_level(logging.INFO, logger="router.sandboxes")
    victim, intruder, other = start_pods(3)
    kube.add_pod(victim.name, victim.ip, **adopted_by("victim"))
    client = kube_router([victim, intruder], pod_cidr=cidrs("127.0.0.0/8"))
    eventually(lambda: pinned(client, "victim").status_code == 200)

    kube.add_pod(intruder.name, intruder.ip, **adopted_by("victim"))
    eventually(lambda: listed(client) == {victim.name, intruder.name})
    hits = (victim.app.hits, intruder.app.hits)
    assert [pinned(client, "victim").status_code for _ in range(3)] == [502] * 3
    for pod in (victim, intruder):
        assert pinned(client, "other", **{"X-Sandbox-Pod-IP": pod.ip}).status_code == 502
    assert (victim.app.hits, intruder.app.hits) == hits

    kube.add_pod(other.name, other.ip, **adopted_by("other"))  # a change of the index
    eventually(lambda: pinned(client, "other").status_code == 200)
    kube.delete_pod(intruder.name)
    eventually(lambda: pinned(client, "victim").status_code == 200)
    assert pinned(client, "victim").json()["pod"] == victim.name
    lines = [r.getMessage() for r in caplog.records if r.name == "router.sandboxes"]
    assert lines == [
        "sandbox index: names answered to by more than one pod, left to DNS: default/victim",
        "sandbox index: every name is answered to by one pod again",
    ]


def test_a_sandbox_named_like_a_warm_pod_reaches_neither_while_the_pod_is_warm(
    kube: FakeKube, kube_router: Any, start_pods: StartPods
) -> None:
    """Warm pod `pod-0` answers to its own name (the pool's answers give it); a sandbox
    named `pod-0` adopted `pod-1`. Two pods answer to `pod-0`: neither gets its pinned
    requests, and the warm one stays in the rotation."""
    warm, adopted = start_pods(2)
    kube.add_pod(warm.name, warm.ip)
    kube.add_pod(adopted.name, adopted.ip, **adopted_by(warm.name))
    client = kube_router([warm, adopted])
    eventually(lambda: listed(client) == {warm.name, adopted.name})

    assert pinned(client, warm.name).status_code == 502
    assert (warm.app.hits, adopted.app.hits) == (0, 0)
    assert served_by(client, 2) == {warm.name: 2}


def test_a_pool_answer_names_the_sandbox_its_pod_serves(
    kube: FakeKube, kube_router: Any, start_pods: StartPods
) -> None:
    """A warm pod controlled by a sandbox of another name (pools that make sandboxes): the
    pool's answer names that sandbox, and pinning the next request to it reaches the pod."""
    (pod,) = start_pods(1)
    kube.add_pod(pod.name, pod.ip, labels={**POOL_LABELS, **sandbox_labels("warm-sbx")},
                 owner="warm-sbx")
    client = kube_router([pod])

    answer = client.get("/")
    assert answer.status_code == 200 and answer.headers["x-sandbox-id"] == "warm-sbx"
    assert pinned(client, "warm-sbx").json()["pod"] == pod.name


def test_a_sandbox_never_in_a_pool_is_reached_by_name(
    kube: FakeKube, kube_router: Any, start_pods: StartPods
) -> None:
    pool, alone = start_pods(2)
    kube.add_pod(pool.name, pool.ip)
    kube.add_pod(alone.name, alone.ip, labels=sandbox_labels(alone.name))
    client = kube_router([pool, alone])

    assert pool_names(client) == {pool.name}
    eventually(lambda: pinned(client, alone.name).status_code == 200)
    assert pinned(client, alone.name).json()["pod"] == alone.name
    assert served_by(client, 4) == {pool.name: 4}


def test_a_pod_that_is_no_sandbox_nor_ready_is_not_indexed(
    kube: FakeKube, kube_router: Any, start_pods: StartPods
) -> None:
    pods = start_pods(5)
    kube.add_pod(pods[0].name, pods[0].ip)
    kube.add_pod(pods[1].name, pods[1].ip, labels={"app": "not-a-sandbox"})
    kube.add_pod(pods[2].name, pods[2].ip, labels=sandbox_labels(pods[2].name), ready=False)
    kube.add_pod(pods[3].name, pods[3].ip, labels=sandbox_labels(pods[3].name), deleting=True)
    kube.add_pod(pods[4].name, pods[4].ip, labels=sandbox_labels(pods[4].name))
    client = kube_router(pods)

    eventually(lambda: pinned(client, pods[4].name).status_code == 200)
    assert [pinned(client, pod.name).status_code for pod in pods] == [200, 502, 502, 502, 200]
    assert [pod.app.hits for pod in pods] == [1, 0, 0, 0, 2]


def test_another_namespace_is_reached_only_with_all_namespaces(
    kube: FakeKube, kube_router: Any, start_pods: StartPods
) -> None:
    home, away = start_pods(2)
    kube.add_pod(home.name, home.ip)
    kube.add_pod(away.name, away.ip, namespace="team-b")
    kube.add_pod("claimed", away.ip, namespace="team-c", labels=sandbox_labels("claimed"))

    narrow = kube_router([home, away])
    assert pinned(narrow, away.name, "team-b").status_code == 502
    assert away.app.hits == 0
    assert {call.namespace for call in kube.calls} == {"default"}

    wide = kube_router([home, away], all_namespaces=True)
    eventually(lambda: pinned(wide, away.name, "team-b").status_code == 200)
    assert pinned(wide, "claimed", "team-c").json()["pod"] == away.name
    assert pinned(wide, home.name).json()["pod"] == home.name
    # The pool stays in --namespace: team-b's warm pod is not in the rotation.
    assert pool_names(wide) == {home.name}
    assert served_by(wide, 4) == {home.name: 4}
    index_calls = {(c.namespace, c.query.get("labelSelector")) for c in kube.calls}
    assert ("", SANDBOX_LABEL) in index_calls  # /api/v1/pods
    assert ("", DEFAULT_SELECTOR) not in index_calls


def test_all_namespaces_needs_the_kubernetes_api() -> None:
    result = run_router(["--pods", "a=10.0.0.1:1", "--all-namespaces"])
    assert result.returncode == 2
    assert result.stderr.strip().endswith("not with --pods or --demo")
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_set_based_pool_selector_is_the_api_servers_to_evaluate(
    kube: FakeKube, kube_router: Any, start_pods: StartPods
) -> None:
    """`--selector` may be any selector: the pool's watch sends it as it is, and pods that
    carry no sandbox label can still be a pool (and be pinned by name, from the pool)."""
    warm, hot, cold = start_pods(3)
    kube.add_pod(warm.name, warm.ip, labels={"tier": "warm"})
    kube.add_pod(hot.name, hot.ip, labels={"tier": "hot", **sandbox_labels(hot.name)})
    kube.add_pod(cold.name, cold.ip, labels={"tier": "cold", **sandbox_labels(cold.name)})
    client = kube_router([warm, hot, cold], selector="tier in (warm, hot)")

    assert pool_names(client) == {warm.name, hot.name}
    eventually(lambda: pinned(client, cold.name).status_code == 200)
    assert pinned(client, warm.name).json()["pod"] == warm.name


def test_the_index_is_served_through_an_api_outage(
    kube: FakeKube, kube_router: Any, start_pods: StartPods
) -> None:
    pods = start_pods(2)
    kube.add_pod(pods[0].name, pods[0].ip)
    kube.add_pod(pods[1].name, pods[1].ip, labels=sandbox_labels(pods[1].name))
    client = kube_router(pods)
    eventually(lambda: pinned(client, pods[1].name).status_code == 200)

    kube.fail(503)
    eventually(lambda: "503" in client.get("/ready").json().get("last_error", ""))
    assert client.get("/ready").status_code == 200
    assert pinned(client, pods[1].name).json()["pod"] == pods[1].name
    kube.fail(None)
    eventually(lambda: "last_error" not in client.get("/ready").json())


def test_a_hint_cannot_redirect_a_known_sandbox_nor_reuse_a_stale_address(
    kube: FakeKube, kube_router: Any, start_pods: StartPods
) -> None:
    """The index's IP is the one address of a sandbox it holds. After an outage, the API
    has given the old sandbox's IP to a new one: a hint still naming it for the old
    sandbox reaches nobody, even inside --pod-cidr."""
    first, second = start_pods(2)
    kube.add_pod("sb-a", first.ip, labels=sandbox_labels("sb-a"))
    kube.add_pod("sb-b", second.ip, labels=sandbox_labels("sb-b"))
    client = kube_router([first, second], pod_cidr=cidrs("127.0.0.0/8"))
    eventually(lambda: pinned(client, "sb-b").status_code == 200)
    port = str(first.port)

    answer = pinned(client, "sb-a", **{"X-Sandbox-Pod-IP": second.ip, "X-Sandbox-Port": port})
    assert answer.json()["pod"] == first.name  # sb-a's own pod, not the hinted one

    kube.fail(503)
    eventually(lambda: "last_error" in client.get("/ready").json())
    kube.delete_pod("sb-a")
    kube.delete_pod("sb-b")
    kube.add_pod("sb-c", first.ip, labels=sandbox_labels("sb-c"))  # sb-a's IP, reused
    kube.fail(None)
    eventually(lambda: pinned(client, "sb-c").status_code == 200)

    hits = first.app.hits
    stale = pinned(client, "sb-a", **{"X-Sandbox-Pod-IP": first.ip, "X-Sandbox-Port": port})
    assert stale.status_code == 502  # the hint is ignored and sb-a has no DNS name
    assert first.app.hits == hits
    assert pinned(client, "sb-c").json()["pod"] == first.name


def test_the_kubeconfig_context_namespace_is_the_default(kube: FakeKube, tmp_path: Path,
                                                         kube_router: Any,
                                                         start_pods: StartPods) -> None:
    path = kube.write_kubeconfig(tmp_path / "team", namespace="team-a")
    assert config.load(["--kubeconfig", str(path)], env={}).namespace == "team-a"
    assert config.load([], env={"KUBECONFIG": str(path)}).namespace == "team-a"
    assert config.load(["--kubeconfig", str(path), "--namespace", "x"], env={}).namespace == "x"
    assert config.load(["--pods", "a=10.0.0.1:1"], env={"KUBECONFIG": str(path)}
                       ).namespace != "team-a"  # a static pool uses no cluster
    merged = f"{tmp_path / 'missing'}:{path}"
    assert config.load([], env={"KUBECONFIG": merged}).namespace == "team-a"

    pods = start_pods(2)
    kube.add_pods(pods[:1], namespace="team-a")
    kube.add_pod(pods[1].name, pods[1].ip, namespace="default", labels=dict(POOL_LABELS))
    loaded = config.load(["--kubeconfig", str(path)], env={})
    client = kube_router(pods, namespace=loaded.namespace)
    assert served_by(client, 2) == {pods[0].name: 2}
    assert {call.namespace for call in kube.calls} == {"team-a"}


def test_memory_per_thousand_sandboxes_is_a_few_hundred_bytes_each(kube: FakeKube,
                                                                   tmp_path: Path) -> None:
    """The index keeps `Pod` values, not API objects: 1,000 sandboxes listed from the fake
    API hold a fraction of what their parsed objects would (`python -m
    tests.index_memory` prints the figures)."""
    figures = measure(kube, tmp_path, 1000)
    assert figures.indexed == 1000
    assert 0 < figures.index_bytes < figures.objects_bytes / 4
