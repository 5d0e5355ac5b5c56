"""The SSRF boundary against real pods: what `X-Sandbox-Pod-IP`, the DNS answer of a pinned
name and a listed pod can make the router connect to, seen at the socket layer."""

from __future__ import annotations

import functools

import httpx
import pytest

from router.config import Config, cidrs
from router.pods import Pod, StaticPodSource
from tests.conftest import StartPods, StartRouter, static_config
from tests.connects import recorded_connects
from tests.sandbox import Pod as Sandbox

NOT_ALLOWED = {"detail": "The backend sandbox address is not allowed."}
DNS_NAME = "sb.team.svc.cluster.local"


class ListedPods(StaticPodSource):
    """A pod source that is not operator-chosen, as the Kubernetes API is: its pods go
    through the address policy like any other address."""

    operator_chosen = False


@pytest.fixture
def observed_router(start_router: StartRouter) -> StartRouter:
    """The router on the standard event loop, so `recorded_connects` sees its connects; the
    tests that expect a connect check that it is seen."""
    return functools.partial(start_router, loop="asyncio")


def listed(sandboxes: list[Sandbox]) -> ListedPods:
    return ListedPods(Pod(s.name, "default", s.ip, s.port) for s in sandboxes)


def by_name(sandbox_id: str = "sb", **headers: str) -> dict[str, str]:
    """Pinned headers for `sandbox_id` in namespace `team` (the DNS_NAME sandbox)."""
    return {"X-Sandbox-ID": sandbox_id, "X-Sandbox-Namespace": "team", **headers}


def ports_reached(connects: list[tuple[str, int]], port: int) -> list[str]:
    return [address for address, reached in connects if reached == port]


def assert_not_allowed(response: httpx.Response, connects: list[tuple[str, int]],
                       pods: list[Sandbox]) -> None:
    """A 502 that names no address, with no connect to the port of `pods` and no request
    served by any of them."""
    assert response.status_code == 502
    assert response.json() == NOT_ALLOWED
    assert ports_reached(connects, pods[0].port) == []
    assert [p.app.hits for p in pods] == [0] * len(pods)


@pytest.mark.parametrize("pod_ip", ["::ffff:127.0.0.1", "::ffff:7f00:1", "::127.0.0.1",
                                    "::ffff:127.0.0.2", "0:0:0:0:0:FFFF:7F00:0001"])
def test_loopback_in_any_form_is_refused_and_nothing_connects(
    start_pods: StartPods, observed_router: StartRouter, pod_ip: str
) -> None:
    pods = start_pods(1)
    victim = start_pods(1, first_ip=1)[0]  # a server on 127.0.0.1 the router does not know
    client = observed_router(static_config(pods))
    with recorded_connects() as connects:
        response = client.post("/", headers={"X-Sandbox-ID": "pod-0", "X-Sandbox-Pod-IP": pod_ip,
                                             "X-Sandbox-Port": str(victim.port)}, content=b"x")
    assert response.status_code == 400
    assert response.json() == {"detail": "Invalid target IP address."}
    assert ports_reached(connects, victim.port) == []
    assert victim.app.hits == pods[0].app.hits == 0
    assert client.get("/", headers={"X-Sandbox-ID": "pod-0"}).json()["pod"] == "pod-0"


def test_a_zone_id_is_not_an_address(start_pods: StartPods, observed_router: StartRouter) -> None:
    pods = start_pods(1)
    client = observed_router(static_config(pods))
    response = client.get("/", headers={"X-Sandbox-ID": "pod-0", "X-Sandbox-Pod-IP": "fe80::1%lo"})
    assert response.status_code == 400
    assert response.json() == {"detail": "Invalid target IP address format."}
    assert pods[0].app.hits == 0


def test_a_known_sandbox_goes_to_its_own_pod_and_a_known_address_serves_no_other(
    start_pods: StartPods, observed_router: StartRouter
) -> None:
    """The index is the one address of a sandbox it holds: another known pod's address,
    in any form, neither redirects that sandbox nor reaches the pod for a name the router
    does not know (the hint may be stale: the API gave that IP to another sandbox)."""
    pods = start_pods(2)
    config = static_config(pods, allow_loopback_pod_ip=True, pod_cidr=cidrs("127.0.0.0/8"))
    client = observed_router(config, names={})
    headers = {"X-Sandbox-ID": "pod-0", "X-Sandbox-Pod-IP": f"::ffff:{pods[1].ip}"}
    assert client.get("/", headers=headers).json()["pod"] == "pod-0"
    headers["X-Sandbox-ID"] = "elsewhere"
    assert client.get("/", headers=headers).status_code == 502  # no DNS name either
    assert [p.app.hits for p in pods] == [1, 0]


@pytest.mark.parametrize("pod_ip", ["10.96.0.1", "::ffff:10.96.0.1", "192.0.2.7"])
def test_an_unknown_harmless_address_is_ignored_and_the_pod_found_by_name(
    start_pods: StartPods, observed_router: StartRouter, pod_ip: str
) -> None:
    pods = start_pods(2)
    client = observed_router(static_config(pods))
    with recorded_connects() as connects:
        response = client.get("/", headers={"X-Sandbox-ID": "pod-1", "X-Sandbox-Pod-IP": pod_ip})
    assert response.json()["pod"] == "pod-1"
    assert ports_reached(connects, pods[0].port) == [pods[1].ip]


def test_an_ignored_address_falls_back_to_the_dns_name(
    start_pods: StartPods, observed_router: StartRouter
) -> None:
    pods = start_pods(1)
    config = static_config([], pod_port=pods[0].port, allow_loopback_pod_ip=True,
                           pod_cidr=cidrs("127.0.0.0/8"))
    client = observed_router(config, source=listed([]), names={DNS_NAME: pods[0].ip})
    with recorded_connects() as connects:
        response = client.get("/", headers=by_name(**{"X-Sandbox-Pod-IP": "10.96.0.1"}))
    assert response.json()["pod"] == "pod-0"
    assert ports_reached(connects, pods[0].port) == [pods[0].ip]


@pytest.mark.parametrize(("pod_cidr", "status"), [("127.0.0.0/24", 200), ("", 502)])
def test_pod_cidr_admits_an_address_the_router_does_not_list(
    start_pods: StartPods, observed_router: StartRouter, pod_cidr: str, status: int
) -> None:
    listed_pod, unlisted = start_pods(2)
    config = static_config([listed_pod], allow_loopback_pod_ip=True, pod_cidr=cidrs(pod_cidr))
    client = observed_router(config, names={})
    headers = {"X-Sandbox-ID": "unlisted", "X-Sandbox-Pod-IP": unlisted.ip,
               "X-Sandbox-Port": str(unlisted.port)}
    assert client.get("/", headers=headers).status_code == status
    assert unlisted.app.hits == (status == 200)
    headers["X-Sandbox-ID"] = "pod-0"  # a known sandbox: its own pod, the hint unused
    assert client.get("/", headers=headers).json()["pod"] == "pod-0"


@pytest.mark.parametrize(("answer", "options"), [
    ("127.0.0.2", {}),  # loopback without --allow-loopback-pod-ip
    ("::ffff:127.0.0.2", {}),
    ("127.0.0.3", {"allow_loopback_pod_ip": True, "pod_cidr": cidrs("127.0.0.2/32")}),
])
def test_a_name_resolving_to_a_refused_address_is_502_naming_no_address(
    start_pods: StartPods, observed_router: StartRouter, answer: str, options: dict[str, object]
) -> None:
    pods = start_pods(2)
    config = static_config([], pod_port=pods[0].port, **options)
    client = observed_router(config, source=listed([]), names={DNS_NAME: answer})
    with recorded_connects() as connects:
        response = client.get("/", headers=by_name())
    assert_not_allowed(response, connects, pods)


def test_a_name_resolving_inside_pod_cidr_is_served(
    start_pods: StartPods, observed_router: StartRouter
) -> None:
    pods = start_pods(1)
    config = static_config([], pod_port=pods[0].port, allow_loopback_pod_ip=True,
                           pod_cidr=cidrs("127.0.0.2/32"))
    client = observed_router(config, source=listed([]), names={DNS_NAME: pods[0].ip})
    assert client.get("/", headers=by_name()).json()["pod"] == "pod-0"


def test_a_name_resolving_to_a_known_pod_is_served_without_pod_cidr(
    start_pods: StartPods, observed_router: StartRouter
) -> None:
    """A name the index leaves to DNS (one two pods answer to, say) whose answer is a pod
    the router lists: a known pod, so no --pod-cidr is needed, and an unknown answer for
    another name is still refused."""
    pod, stranger = start_pods(2)
    config = static_config([], pod_port=pod.port, allow_loopback_pod_ip=True)
    client = observed_router(config, source=listed([pod]),
                             names={DNS_NAME: pod.ip, "other.team.svc.cluster.local": stranger.ip})
    assert client.get("/", headers=by_name()).json()["pod"] == "pod-0"
    with recorded_connects() as connects:
        response = client.get("/", headers=by_name("other"))
    assert_not_allowed(response, connects, [stranger])


def test_listed_pods_on_a_refused_address_are_never_connected(
    start_pods: StartPods, observed_router: StartRouter
) -> None:
    """Pod IPs from the API are data a cluster user controls: without the flag a listed pod
    on loopback is skipped by the pool and refused when pinned by name."""
    pods = start_pods(2)
    client = observed_router(Config(port=0, metrics_port=0, log_level="warning"),
                          source=listed(pods))
    with recorded_connects() as connects:
        pool = client.get("/")
        pinned = client.get("/", headers={"X-Sandbox-ID": "pod-1"})
    assert pool.status_code == 502
    assert pool.json() == {"detail": "Could not connect to any warm pool pod."}
    assert_not_allowed(pinned, connects, pods)


def test_an_operator_chosen_loopback_host_is_open_on_its_own_port_only(
    start_pods: StartPods, observed_router: StartRouter
) -> None:
    """`--pods` on loopback (a sidecar) used to exempt the whole host from the class
    refusal: `X-Sandbox-Port` then reached any port of the router's own loopback (its
    metrics, a mesh proxy's admin port)."""
    pods = start_pods(1)
    victim = start_pods(1)[0]  # another server on the same loopback address, its own port
    assert victim.ip == pods[0].ip and victim.port != pods[0].port
    client = observed_router(static_config(pods))
    with recorded_connects() as connects:
        response = client.get("/", headers={"X-Sandbox-ID": "pod-0",
                                            "X-Sandbox-Port": str(victim.port)})
    assert_not_allowed(response, connects, [victim])
    assert client.get("/", headers={"X-Sandbox-ID": "pod-0"}).json()["pod"] == "pod-0"
    opened = observed_router(static_config(pods, allow_loopback_pod_ip=True))
    assert opened.get("/", headers={"X-Sandbox-ID": "pod-0", "X-Sandbox-Port": str(victim.port)}
                      ).json()["pod"] == victim.name  # the operator opened loopback


def test_listed_loopback_pods_are_served_with_the_flag(
    start_pods: StartPods, observed_router: StartRouter
) -> None:
    pods = start_pods(2)
    config = Config(port=0, metrics_port=0, log_level="warning", allow_loopback_pod_ip=True)
    client = observed_router(config, source=listed(pods))
    served = {client.get("/").json()["pod"] for _ in range(4)}
    assert served == {"pod-0", "pod-1"}
    assert client.get("/", headers={"X-Sandbox-ID": "pod-1"}).json()["pod"] == "pod-1"


@pytest.mark.parametrize(("pod_cidr", "status"), [
    ("", 502),  # the default: only the pods the router knows
    ("127.0.0.2/32", 502),  # the pod network
    ("127.0.0.0/8", 200),  # a network the operator opened that holds the API server
])
def test_a_service_name_reaches_the_api_server_only_inside_pod_cidr(
    start_pods: StartPods, observed_router: StartRouter, pod_cidr: str, status: int
) -> None:
    """`X-Sandbox-ID: kubernetes` in `default` is the API server's Service name: its answer
    (here a stand-in on 127.0.0.3) is no pod the router knows. It was reached by default
    (an empty --pod-cidr meant every address outside the refused classes)."""
    pod, api_server = start_pods(2)
    config = static_config([pod], allow_loopback_pod_ip=True, pod_cidr=cidrs(pod_cidr),
                           pod_port=pod.port)
    client = observed_router(config, names={"kubernetes.default.svc.cluster.local": "127.0.0.3"})
    with recorded_connects() as connects:
        response = client.get("/", headers={"X-Sandbox-ID": "kubernetes"})
    assert response.status_code == status
    assert (api_server.ip in ports_reached(connects, pod.port)) == (status == 200)
    assert api_server.app.hits == (status == 200)
