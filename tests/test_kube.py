"""The Kubernetes pod source, end to end: the router lists and watches a fake API server
through the official client, and routes to pods that are real servers on 127.0.0.x."""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import time
import urllib.request
from pathlib import Path
from typing import Any

import httpx
import pytest
from urllib3.util import Retry

from router import kube as kube_module
from router.config import DEFAULT_SELECTOR, Config
from router.kube import Schedule, candidate, connect
from router.metrics import Metrics
from router.observe import NullObserver, Refresh
from router.sandbox_ids import SANDBOX_LABEL, fnv1a_32
from tests import fake_kube
from tests.conftest import StartPods, eventually
from tests.fake_kube import TOKEN, Call, FakeKube, adopted_by, pod_object
from tests.kube_router import pool_names, ready, served_by
from tests.process import RouterProcess, run_router


class RefreshLog(NullObserver):
    def __init__(self) -> None:
        self.refreshes: collections.Counter[str] = collections.Counter()

    def pod_list_refreshed(self, outcome: Refresh) -> None:
        self.refreshes[outcome] += 1


def test_fnv1a_matches_the_controller_hash() -> None:
    assert fnv1a_32("") == "811c9dc5"
    assert fnv1a_32("a") == "e40c292c"
    assert fnv1a_32("foobar") == "bf9cf968"


def _malformed(path: str, value: Any) -> dict[str, Any]:
    obj = pod_object("pod-0", "10.0.0.1")
    *parents, last = path.split(".")
    target = obj
    for part in parents:
        target = target[part]
    target[last] = value
    return obj


@pytest.mark.parametrize(("path", "value", "routed"), [
    ("metadata", ["pod-0"], False), ("status", "Running", False),
    ("status.conditions", {"Ready": "True"}, False),
    ("status.conditions", [["Ready", "True"]], False),
    ("status.podIP", ["10.0.0.1"], False), ("metadata.name", 7, False),
    ("metadata.namespace", {"n": 1}, False),
    # Only the sandbox name is read from these: the pod answers to its own.
    ("metadata.labels", ["x"], True), ("metadata.ownerReferences", {"kind": "Sandbox"}, True),
])
def test_a_malformed_pod_object_is_no_candidate_and_breaks_nothing(
        path: str, value: Any, routed: bool) -> None:
    """One odd object must not fail the whole list (every pod of it unserved): it is just
    not a pod to route to."""
    assert candidate(pod_object("pod-0", "10.0.0.1"), 8888) is not None
    pod = candidate(_malformed(path, value), 8888)
    assert (pod is not None) == routed
    assert pod is None or pod.sandbox_id == "pod-0"


def test_a_watch_event_for_a_nameless_object_is_skipped_not_a_relist(
    kube: FakeKube, kube_router: Any, start_pods: StartPods
) -> None:
    """It was taken for an unknown event type: the watch failed, backed off and listed
    everything again."""
    first, second = start_pods(2)
    kube.add_pod(first.name, first.ip)
    client = kube_router([first, second])
    lists = kube.count("list")
    kube.add_pod("", "10.0.0.9")  # no name: a fake can send what an API server never would
    kube.add_pod(second.name, second.ip)
    eventually(lambda: pool_names(client) == {first.name, second.name})
    assert kube.count("list") == lists


def test_schedule_follows_the_cache_ttl() -> None:
    assert Schedule.of(3.0) == Schedule(watch_window=3, relist_every=60.0,
                                        backoff_first=0.25, backoff_cap=3.0)
    assert Schedule.of(0.5).watch_window == 1
    assert Schedule.of(100).relist_every == 300.0


def test_round_robin_over_listed_pods(kube: FakeKube, kube_router: Any, start_pods: StartPods
                                      ) -> None:
    pods = kube.add_pods(start_pods(3))
    client = kube_router(pods)

    assert client.get("/ready").json() == {"status": "ready", "pods": 3}
    assert served_by(client, 300) == {"pod-0": 100, "pod-1": 100, "pod-2": 100}
    assert client.get("/").headers["x-sandbox-namespace"] == "default"


def test_only_ready_running_addressed_selected_pods_are_used(
    kube: FakeKube, kube_router: Any, start_pods: StartPods
) -> None:
    pods = start_pods(8)
    good = pods[:2]
    kube.add_pod(pods[0].name, pods[0].ip)
    kube.add_pod(pods[1].name, pods[1].ip)
    kube.add_pod(pods[2].name, pods[2].ip, ready=False)
    kube.add_pod(pods[3].name, pods[3].ip, phase="Pending")
    kube.add_pod(pods[4].name, None)
    kube.add_pod(pods[5].name, pods[5].ip, deleting=True)
    kube.add_pod(pods[6].name, pods[6].ip, labels={"app": "something-else"})
    kube.add_pod(pods[7].name, pods[7].ip, namespace="elsewhere")
    client = kube_router(pods)

    assert served_by(client, 60) == {good[0].name: 30, good[1].name: 30}
    assert [pod.app.hits for pod in pods[2:]] == [0] * 6


def test_pods_joining_and_leaving_are_followed(
    kube: FakeKube, kube_router: Any, start_pods: StartPods
) -> None:
    pods = start_pods(3)
    kube.add_pod(pods[0].name, pods[0].ip)
    kube.add_pod(pods[1].name, pods[1].ip)
    client = kube_router(pods)

    kube.add_pod(pods[2].name, pods[2].ip)
    eventually(lambda: pool_names(client) == {"pod-0", "pod-1", "pod-2"})
    assert set(served_by(client, 3)) == {"pod-0", "pod-1", "pod-2"}

    kube.update_pod(pods[0].name, pods[0].ip, ready=False)
    kube.delete_pod(pods[1].name)
    eventually(lambda: pool_names(client) == {"pod-2"})
    assert served_by(client, 10) == {"pod-2": 10}


def test_a_pod_leaving_the_selector_is_dropped(
    kube: FakeKube, kube_router: Any, start_pods: StartPods
) -> None:
    pods = kube.add_pods(start_pods(2))
    client = kube_router(pods)
    eventually(lambda: pool_names(client) == {"pod-0", "pod-1"})

    kube.update_pod(pods[0].name, pods[0].ip, labels={"claimed": "yes"})
    eventually(lambda: pool_names(client) == {"pod-1"})


def test_traffic_does_not_add_api_calls(
    kube: FakeKube, kube_router: Any, start_pods: StartPods
) -> None:
    pods = kube.add_pods(start_pods(3))
    client = kube_router(pods, cache_ttl=2.0)
    started = time.monotonic()
    watches_before = {s: kube.count("watch", s) for s in (DEFAULT_SELECTOR, SANDBOX_LABEL)}

    assert sum(served_by(client, 1500).values()) == 1500
    for _ in range(100):  # pinned requests read the index, never the API
        assert client.get("/", headers={"X-Sandbox-ID": "pod-1"}).status_code == 200

    elapsed = time.monotonic() - started
    # The schedule, for the pool and for the index: one list, then one watch per 2 s
    # window (plus the one open at each end).
    for selector, before in watches_before.items():
        assert kube.count("list", selector) == 1
        assert kube.count("watch", selector) - before <= elapsed / 2 + 2
    assert len(kube.calls) == sum(kube.count(verb, s) for verb in ("list", "watch")
                                  for s in watches_before)


def test_an_outage_keeps_the_router_ready_over_its_last_good_list(
    kube: FakeKube, kube_router: Any, start_pods: StartPods, caplog: pytest.LogCaptureFixture
) -> None:
    """Static stability, the default (`--max-stale 0`): a control-plane outage must not
    take the router out of the Service; it only shows, in `/ready`, the age metric and
    the log."""
    caplog.set_level(logging.INFO, logger="router.kube")
    pods = kube.add_pods(start_pods(2))
    metrics = Metrics(proxy_timeout=30)
    client = kube_router(pods, metrics=metrics)
    assert client.get("/ready").json() == {"status": "ready", "pods": 2}

    kube.fail(503)
    # The dropped watch fails first; then every call answers 503.
    eventually(lambda: "503" in client.get("/ready").json().get("last_error", ""))
    answer = client.get("/ready")
    assert answer.status_code == 200
    body = answer.json()
    assert body["status"] == "ready" and body["pods"] == 2
    assert body["last_error"] == "Kubernetes API answered 503 Service Unavailable"
    assert body["stale_seconds"] >= 0
    kube.wait_for(lambda: kube.count("list") >= 3)  # failed again, and again
    age = metrics.registry.get_sample_value("warmpool_router_pod_list_age_seconds")
    assert age is not None and age >= body["stale_seconds"] - 0.05  # /ready rounds to 0.1 s
    assert ready(client)
    assert served_by(client, 10) == {"pod-0": 5, "pod-1": 5}
    stale_lines = [r for r in caplog.records if "pod list is stale" in r.getMessage()]
    assert len(stale_lines) == 1  # at most one a minute, however often the retries fail
    assert stale_lines[0].levelno == logging.WARNING
    assert "still routing over its 2 pods" in stale_lines[0].getMessage()

    kube.fail(None)
    eventually(lambda: client.get("/ready").json() == {"status": "ready", "pods": 2})
    assert any("the Kubernetes API answers again" in r.getMessage() and r.levelno == logging.INFO
               for r in caplog.records)


def test_with_max_stale_an_outage_fails_readiness_then_recovers(
    kube: FakeKube, kube_router: Any, start_pods: StartPods
) -> None:
    pods = kube.add_pods(start_pods(2))
    refreshes = RefreshLog()
    client = kube_router(pods, observer=refreshes, max_stale=2.0)

    kube.fail(503)
    kube.wait_for(lambda: kube.calls[-1].verb == "list")  # the failing re-list
    assert served_by(client, 10) == {"pod-0": 5, "pod-1": 5}
    eventually(lambda: not ready(client))
    answer = client.get("/ready")
    assert answer.status_code == 503
    assert "stale" in answer.json()["reason"]
    assert "503" in answer.json()["reason"]
    assert refreshes.refreshes["error"] >= 1
    assert served_by(client, 4) == {"pod-0": 2, "pod-1": 2}  # still routed while stale

    kube.fail(None)
    eventually(lambda: ready(client))


def test_not_ready_until_the_first_list_succeeds(
    kube: FakeKube, kube_router: Any, start_pods: StartPods
) -> None:
    pods = start_pods(1)
    kube.add_pod(pods[0].name, pods[0].ip)
    kube.fail(403)
    client = kube_router(pods, wait=False)
    kube.wait_for(lambda: kube.count("list") >= 2)

    answer = client.get("/ready")
    assert answer.status_code == 503
    assert answer.json() == {
        "status": "not ready",
        "reason": "pod list not synced yet: Kubernetes API answered 403 Forbidden",
    }
    assert client.get("/").json() == {"detail": "No warm pool pods are available."}

    kube.fail(None)
    eventually(lambda: ready(client))
    assert client.get("/").status_code == 200


def test_an_answer_that_is_not_json_is_reported(
    kube: FakeKube, kube_router: Any, start_pods: StartPods
) -> None:
    pods = start_pods(1)
    kube.garbage = True
    client = kube_router(pods, wait=False)
    kube.wait_for(lambda: kube.count("list") >= 2)

    reason = client.get("/ready").json()["reason"]
    assert reason == (
        "pod list not synced yet: ValueError: the API answered something that is not JSON"
    )
    assert client.get("/healthz").status_code == 200


def test_gone_leads_to_a_relist(kube: FakeKube, kube_router: Any, start_pods: StartPods
                                ) -> None:
    pods = start_pods(2)
    kube.add_pod(pods[0].name, pods[0].ip)
    client = kube_router(pods)

    kube.compact()
    kube.drop_watches()
    kube.wait_for(lambda: kube.count("list") == 2)
    kube.add_pod(pods[1].name, pods[1].ip)
    eventually(lambda: pool_names(client) == {"pod-0", "pod-1"})


def test_a_dropped_watch_is_resumed(kube: FakeKube, kube_router: Any, start_pods: StartPods
                                    ) -> None:
    pods = start_pods(2)
    kube.add_pod(pods[0].name, pods[0].ip)
    client = kube_router(pods)

    kube.drop_watches()
    kube.add_pod(pods[1].name, pods[1].ip)
    eventually(lambda: pool_names(client) == {"pod-0", "pod-1"})
    assert ready(client)


def test_watch_resumes_from_a_bookmark(kube: FakeKube, kube_router: Any, start_pods: StartPods
                                       ) -> None:
    pods = start_pods(1)
    kube.add_pod(pods[0].name, pods[0].ip)
    kube_router(pods)
    kube.wait_for(lambda: kube.count("watch") >= 1)

    kube.bookmark()
    watches = kube.count("watch")
    kube.wait_for(lambda: kube.count("watch") > watches)
    assert kube.calls[-1].query["resourceVersion"] == str(kube.version)
    assert kube.calls[-1].query["allowWatchBookmarks"] == "true"


def test_warm_pool_selects_by_the_hash_label(
    kube: FakeKube, kube_router: Any, start_pods: StartPods
) -> None:
    pods = start_pods(4)
    for pod, pool in zip(pods, ["pool-a", "pool-b", "pool-a", "pool-b"], strict=True):
        kube.add_pod(pod.name, pod.ip, labels={DEFAULT_SELECTOR: fnv1a_32(pool)})
    client = kube_router(pods, warm_pool="pool-a")

    assert served_by(client, 10) == {"pod-0": 5, "pod-2": 5}
    # The pool's own watch (the sandbox index watches the name-hash label beside it).
    selectors = {call.query.get("labelSelector") for call in kube.calls}
    assert f"{DEFAULT_SELECTOR}={fnv1a_32('pool-a')}" in selectors


def test_namespace_selects_where_pods_are_listed(
    kube: FakeKube, kube_router: Any, start_pods: StartPods
) -> None:
    pods = start_pods(3)
    kube.add_pod(pods[0].name, pods[0].ip, namespace="team-a")
    kube.add_pod(pods[1].name, pods[1].ip)
    kube.add_pod(pods[2].name, pods[2].ip, namespace="team-a")
    client = kube_router(pods, namespace="team-a")

    answers = [client.get("/") for _ in range(4)]
    assert collections.Counter(a.headers["x-sandbox-id"] for a in answers) == {
        "pod-0": 2, "pod-2": 2}
    assert {a.headers["x-sandbox-namespace"] for a in answers} == {"team-a"}
    assert {call.namespace for call in kube.calls} == {"team-a"}


def test_pinned_request_reaches_a_pool_pod_by_name_without_dns(
    kube: FakeKube, kube_router: Any, start_pods: StartPods
) -> None:
    pods = start_pods(3)
    kube.add_pods(pods, namespace="team-a")
    client = kube_router(pods, namespace="team-a")

    for _ in range(3):
        answer = client.get("/", headers={"X-Sandbox-ID": "pod-1",
                                          "X-Sandbox-Namespace": "team-a"})
        assert answer.status_code == 200
    assert [pod.app.hits for pod in pods] == [0, 3, 0]
    # Not in the cache and no DNS name for it: the DNS form fails, nothing else is tried.
    missing = client.get("/", headers={"X-Sandbox-ID": "gone", "X-Sandbox-Namespace": "team-a"})
    assert missing.status_code == 502


def test_a_hanging_api_never_holds_up_requests(
    kube: FakeKube, kube_router: Any, start_pods: StartPods
) -> None:
    pods = kube.add_pods(start_pods(2))
    client = kube_router(pods)

    with kube.hang():
        kube.wait_for(lambda: kube.hanging == 2)  # the pool's call and the index's
        assert served_by(client, 200) == {"pod-0": 100, "pod-1": 100}
        assert client.get("/", headers={"X-Sandbox-ID": "pod-1"}).status_code == 200
        assert ready(client)
        assert kube.hanging == 2  # both API calls were pending the whole time
    eventually(lambda: kube.hanging == 0)


def test_start_up_fails_clearly_without_a_kubeconfig(tmp_path: Path) -> None:
    result = run_router(["--kubeconfig", str(tmp_path / "missing"), "--port", "0",
                         "--metrics-port", "0"])
    assert result.returncode != 0
    assert "cannot load the Kubernetes configuration" in result.stderr
    assert "Traceback" not in result.stderr


KUBECONFIG_CONTEXT = "apiVersion: v1\nkind: Config\ncurrent-context: x\n"


@pytest.mark.parametrize("content, problem", [
    ("a: [b\n", "not valid YAML: expected ',' or ']', but got '<stream end>' at line 2"),
    ("- a\n- b\n", "a YAML mapping is expected, the file holds a list"),
    ("just words\n", "a YAML mapping is expected, the file holds a single value"),
    ("", "the file is empty"),
    ("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\nusers: []\n",
     "Expected key current-context"),
    (KUBECONFIG_CONTEXT + "contexts: [{name: x, context: {cluster: c, user: u}}]\n"
     "clusters: [{name: c, cluster: 5}]\nusers: []\n", "malformed kubeconfig (TypeError"),
    ("\udcff", "invalid start byte"),  # written as bytes below: not UTF-8
], ids=["bad-yaml", "list", "scalar", "empty", "no-current-context", "malformed", "binary"])
def test_an_unusable_kubeconfig_is_one_line_and_exit_2(
    tmp_path: Path, content: str, problem: str
) -> None:
    path = tmp_path / "kubeconfig"
    path.write_bytes(content.encode("utf-8", "surrogateescape"))
    assert_refused(path, problem)


def test_a_kubeconfig_that_cannot_be_read_is_one_line_and_exit_2(tmp_path: Path) -> None:
    assert_refused(tmp_path, "Is a directory")
    (tmp_path / "file").write_text("a: b\n")
    assert_refused(tmp_path / "file" / "kubeconfig", "Not a directory")
    if os.geteuid() != 0:  # root reads whatever the mode bits say
        unreadable = tmp_path / "unreadable"
        unreadable.write_text("a: b\n")
        unreadable.chmod(0)
        assert_refused(unreadable, "Permission denied")


def assert_refused(path: Path, problem: str) -> None:
    result = run_router(["--kubeconfig", str(path), "--port", "0", "--metrics-port", "0"])
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(
        f"warmpool-router: error: cannot load the Kubernetes configuration (--kubeconfig {path})"
    )
    assert problem in lines[0]


def test_refreshes_pods_and_age_are_reported_as_metrics(
    kube: FakeKube, kube_router: Any, start_pods: StartPods
) -> None:
    pods = kube.add_pods(start_pods(2))
    metrics = Metrics(proxy_timeout=30)
    sample = metrics.registry.get_sample_value
    with kube.hang():
        client = kube_router(pods, metrics=metrics, wait=False)
        kube.wait_for(lambda: kube.hanging == 2)  # the pool's list and the index's
        assert sample("warmpool_router_pod_list_age_seconds") == math.inf  # never synced
        assert sample("warmpool_router_pool_pods") == 0
    eventually(lambda: ready(client))
    assert sample("warmpool_router_pool_pods") == 2
    assert sample("warmpool_router_pod_list_age_seconds") < 30
    assert sample("warmpool_router_pod_list_refreshes_total", {"outcome": "ok"}) >= 1

    kube.fail(500)
    eventually(lambda: sample("warmpool_router_pod_list_refreshes_total",
                              {"outcome": "error"}) >= 1)


def test_the_command_finds_the_api_through_kubeconfig(
    kube: FakeKube, tmp_path: Path, start_pods: StartPods
) -> None:
    pods = kube.add_pods(start_pods(2))
    path = kube.write_kubeconfig(tmp_path / "kubeconfig")
    router = RouterProcess(["--pod-port", str(pods[0].port), "--allow-loopback-pod-ip"],
                           env={"KUBECONFIG": str(path)})
    try:
        with httpx.Client(base_url=router.url) as client:
            eventually(lambda: ready(client))
            assert served_by(client, 4) == {"pod-0": 2, "pod-1": 2}
    finally:
        assert router.stop() == 0
    assert {call.query["labelSelector"] for call in kube.calls} == {DEFAULT_SELECTOR,
                                                                   SANDBOX_LABEL}


def _gaps(kube: FakeKube, verb: str, since: int) -> list[float]:
    """Seconds between the pool's `verb` calls, from its `since`-th on."""
    with kube.changed:
        times = [call.at for call in kube.calls
                 if call.verb == verb and call.query.get("labelSelector") == DEFAULT_SELECTOR]
    times = times[since:]
    return [later - earlier for earlier, later in zip(times, times[1:], strict=False)]


def test_watches_failing_while_lists_answer_are_backed_off_and_warned_of_once(
    kube: FakeKube, kube_router: Any, start_pods: StartPods, caplog: pytest.LogCaptureFixture
) -> None:
    """Each good list reset the backoff and the warning's rate limit: with every watch
    refused (a 429 from an API server throttling), the router re-listed four times a
    second and warned at every round. Backoff from 0.25 s doubling to the cap (--cache-ttl
    1 s here), jittered down to half: the waits before the later re-lists are at least
    0.5 s (lower bounds: a slow machine only lengthens them)."""
    caplog.set_level(logging.INFO, logger="router.kube")
    client = kube_router(kube.add_pods(start_pods(2)), cache_ttl=1.0)
    since = kube.count("list", DEFAULT_SELECTOR)
    kube.fail_watches(429)
    kube.wait_for(lambda: kube.count("list", DEFAULT_SELECTOR) >= since + 5, timeout=20)
    gaps = _gaps(kube, "list", since)[:4]
    assert min(gaps[2:]) >= 0.5, gaps
    warned = [r.getMessage() for r in caplog.records
              if r.levelno >= logging.WARNING and r.getMessage().startswith("pod list")]
    assert len(warned) == 1, warned  # at most once a minute
    # Nor is a good list the end of the outage: the watches have not answered once.
    assert not any("answers again" in r.getMessage() for r in caplog.records)
    assert "429" in client.get("/ready").json()["last_error"]
    assert served_by(client, 4) == {"pod-0": 2, "pod-1": 2}
    kube.fail_watches(None)
    eventually(lambda: any("answers again" in r.getMessage() for r in caplog.records))


def test_a_list_answered_410_is_backed_off_not_repeated_in_a_loop(
    kube: FakeKube, kube_router: Any, start_pods: StartPods
) -> None:
    """410 on a first page (no continue token to start over from) is a failure, not
    expired history to re-list from at once: that was dozens of lists a second."""
    kube_router(kube.add_pods(start_pods(2)), cache_ttl=1.0)
    since = kube.count("list", DEFAULT_SELECTOR)
    kube.fail(410)
    kube.wait_for(lambda: kube.count("list", DEFAULT_SELECTOR) >= since + 5, timeout=20)
    gaps = _gaps(kube, "list", since)[:4]
    kube.fail(None)
    assert min(gaps[2:]) >= 0.5, gaps


def test_watches_that_end_at_once_are_backed_off_not_reopened_in_a_loop(
    kube: FakeKube, kube_router: Any, start_pods: StartPods
) -> None:
    """A watch answered and ended with no event (a proxy that does not stream) was
    reopened at once: hundreds of calls a second. One that lasts under
    `MIN_WATCH` is now backed off from as a failed one is (client-go's reflector does
    the same)."""
    client = kube_router(kube.add_pods(start_pods(2)), cache_ttl=1.0)
    since = kube.count("watch", DEFAULT_SELECTOR)
    kube.end_watches_at_once()
    kube.wait_for(lambda: kube.count("watch", DEFAULT_SELECTOR) >= since + 5, timeout=20)
    gaps = _gaps(kube, "watch", since)[:4]
    assert min(gaps[2:]) >= 0.5, gaps
    assert ready(client)


def test_the_api_client_never_resends_a_call_itself(kube: FakeKube, tmp_path: Path) -> None:
    """urllib3 re-sends a call 3 times by default: a hung watch then failed only after four
    read timeouts, unseen in /ready and the log meanwhile. The watch loop retries, with
    its backoff and its report."""
    path = kube.write_kubeconfig(tmp_path / "kubeconfig")
    api = connect(Config(kubeconfig=str(path)))
    try:
        assert api.configuration.retries is False
        pooled = api.rest_client.pool_manager.connection_pool_kw.get("retries")
        assert Retry.from_int(pooled).total is False  # no key: urllib3's default, 3
    finally:
        api.close()


def test_sigterm_while_the_api_hangs_ends_within_the_shutdown_timeout(
    kube: FakeKube, tmp_path: Path, start_pods: StartPods
) -> None:
    """The watch threads, blocked in calls that get no answer (nothing to interrupt), were
    each waited for up to a watch window (--cache-ttl 30 here): a minute past the drain
    budget, where the kubelet's SIGKILL comes. They are daemons, given one second together."""
    pods = kube.add_pods(start_pods(2))
    path = kube.write_kubeconfig(tmp_path / "kubeconfig")
    router = RouterProcess(["--pod-port", str(pods[0].port), "--allow-loopback-pod-ip",
                            "--cache-ttl", "30", "--shutdown-timeout", "1",
                            "--drain-grace", "0"], env={"KUBECONFIG": str(path)})
    try:
        with httpx.Client(base_url=router.url) as client:
            eventually(lambda: ready(client))
        with kube.hang():
            kube.wait_for(lambda: kube.hanging == 2, timeout=15)
            router.process.terminate()
            assert router.process.wait(15) == 0  # while both calls still hang
            assert kube.hanging == 2
    finally:
        router.kill()


def test_a_list_is_read_a_page_at_a_time(
    kube: FakeKube, kube_router: Any, start_pods: StartPods, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A whole list in one answer made the router's memory follow every pod object of the
    namespace (5,000 pods of 8 KB: 401 MiB, over the manifest's limit, at every start).
    Pages of `LIST_PAGE` (2 here), one snapshot: every pod is served, the watch goes on
    from the list's version, and no answer held more than a page."""
    monkeypatch.setattr(kube_module, "LIST_PAGE", 2)
    pods = kube.add_pods(start_pods(5))
    for index in range(3):  # pods that are not ready: listed, never served
        kube.add_pod(f"pending-{index}", f"10.1.0.{index}", ready=False)
    client = kube_router(pods)
    assert served_by(client, 10) == {pod.name: 2 for pod in pods}
    assert kube.page_sizes and max(kube.page_sizes) == 2
    assert {call.query.get("limit") for call in kube.calls if call.verb == "list"} == {"2"}
    assert kube.count("list", DEFAULT_SELECTOR) == 4  # 8 pool pods in pages of 2
    kube.delete_pod("pod-0")  # the watch follows from the version of the paged list
    eventually(lambda: pool_names(client) == {"pod-1", "pod-2", "pod-3", "pod-4"})


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_a_large_pod_list_syncs_within_the_manifests_memory_request(
    kube: FakeKube, tmp_path: Path
) -> None:
    """5,000 pods of about 8 KB each (managed fields, as real pods carry 5-20 KB), in both
    lists (pool and index): read whole, the sync peaked at 401 MiB, past the manifest's
    512 MiB limit with a few more pods, at every start; a page at a time, 169 MiB."""
    for index in range(5000):
        kube.add_pod(f"sb-{index}", f"10.1.{index // 256}.{index % 256}")
    fields = {f"f:field-{i}": {"f:value": "x" * 40} for i in range(8000 // 60)}
    for obj in kube.objects.values():
        obj["metadata"]["managedFields"] = [
            {"manager": "kubelet", "operation": "Update", "fieldsV1": fields}]
    path = kube.write_kubeconfig(tmp_path / "kubeconfig")
    router = RouterProcess(["--pod-port", "8888"], env={"KUBECONFIG": str(path)})
    try:
        with httpx.Client(base_url=router.url) as client:
            eventually(lambda: client.get("/ready").json().get("pods") == 5000, timeout=120)
        peak = _peak_rss(router.process.pid)
    finally:
        assert router.stop() == 0
    assert peak < 256 * 1024 * 1024, f"{peak / 2**20:.0f} MiB"  # the manifest's request


def _get(kube: FakeKube, query: str) -> dict[str, Any]:
    request = urllib.request.Request(f"{kube.url}/api/v1/namespaces/default/pods?{query}",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=5) as answer:
        return json.loads(answer.read())  # type: ignore[no-any-return]


def test_the_fake_apis_continue_token_serves_its_own_lists_pages(kube: FakeKube) -> None:
    """The pool's and the index's lists page side by side at the same version: a token
    of version and offset alone made the pool's next page the index's."""
    for index in range(3):
        kube.add_pod(f"warm-{index}", f"10.0.0.{index + 1}")
    for index in range(3):
        kube.add_pod(f"claimed-{index}", f"10.0.1.{index + 1}", **adopted_by(f"sb-{index}"))
    first = _get(kube, f"labelSelector={DEFAULT_SELECTOR}&limit=2")
    _get(kube, f"labelSelector={SANDBOX_LABEL}&limit=2")  # the index's first page
    rest = _get(kube, f"labelSelector={DEFAULT_SELECTOR}&limit=2"
                      f"&continue={first['metadata']['continue']}")
    names = [item["metadata"]["name"] for item in first["items"] + rest["items"]]
    assert sorted(names) == ["warm-0", "warm-1", "warm-2"]


def test_the_pool_and_the_index_paging_at_once_keep_their_own_pods(
    kube: FakeKube, kube_router: Any, start_pods: StartPods, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kube_module, "LIST_PAGE", 2)
    pods = start_pods(8)
    kube.add_pods(pods[:4])
    for pod in pods[4:]:  # claimed: in the index, not in the pool
        kube.add_pod(pod.name, pod.ip, **adopted_by(f"sb-{pod.name}"))
    client = kube_router(pods)
    assert pool_names(client) == {"pod-0", "pod-1", "pod-2", "pod-3"}


def test_watches_that_always_end_at_once_show_as_an_outage(
    kube: FakeKube, kube_router: Any, start_pods: StartPods, caplog: pytest.LogCaptureFixture
) -> None:
    """Each empty watch counted as the API vouching for the list: no error, no warning,
    the age metric fresh, while a deleted pod stayed routed until the next full re-list."""
    caplog.set_level(logging.INFO, logger="router.kube")
    kube.empty_watches = True  # from the start: no watch was ever cut, nothing failed
    client = kube_router(kube.add_pods(start_pods(3)), cache_ttl=1.0)
    since = kube.count("watch", DEFAULT_SELECTOR)
    kube.wait_for(lambda: kube.count("watch", DEFAULT_SELECTOR) >= since + 3, timeout=20)
    body = client.get("/ready").json()
    assert body["status"] == "ready" and "a watch ended after" in body["last_error"]
    warned = [r.getMessage() for r in caplog.records
              if r.levelno >= logging.WARNING and r.getMessage().startswith("pod list")]
    assert len(warned) == 1


def test_continue_pages_expiring_every_time_are_reported(
    kube: FakeKube, kube_router: Any, start_pods: StartPods, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every continue token answered 410: the list never completes. Backed off from, but
    it was never reported (no warning, no error; with --max-stale the reason ended in
    `: None`)."""
    monkeypatch.setattr(kube_module, "LIST_PAGE", 2)
    expiring: list[bool] = []
    admit = fake_kube._Handler._admit

    def expire_continues(self: Any, call: Call) -> bool:
        if expiring and call.verb == "list" and call.query.get("continue"):
            with self.kube.changed:
                self.kube.calls.append(call)
                self.kube.changed.notify_all()
            self._json(410, fake_kube.status(410, "Expired", "continue token expired"))
            return False
        return admit(self, call)

    monkeypatch.setattr(fake_kube._Handler, "_admit", expire_continues)
    caplog.set_level(logging.INFO, logger="router.kube")
    client = kube_router(kube.add_pods(start_pods(5)), cache_ttl=1.0, max_stale=2.0)
    expiring.append(True)
    kube.compact()  # the next watch gets 410: a routine re-list, whose pages then expire
    eventually(lambda: not ready(client), timeout=40)  # the list is never confirmed again
    reason = client.get("/ready").json()["reason"]
    assert "history expired" in reason and not reason.endswith(": None"), reason
    warned = [r.getMessage() for r in caplog.records
              if r.levelno >= logging.WARNING and r.getMessage().startswith("pod list")]
    assert len(warned) == 1, warned
