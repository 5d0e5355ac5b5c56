"""Property tests of the address policy (`router/targets.py`): every refused class, in every
textual form an IPv6 address can carry an IPv4 one, is refused by the policy and never
reaches connect() through a real router."""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router import targets
from router.config import Network, cidrs
from router.errors import ProxyError
from router.pods import Pod, StaticPodSource
from tests.conftest import StartPods, StartRouter, static_config
from tests.connects import recorded_connects

EVERYWHERE = cidrs("0.0.0.0/0,::/0")
PROPERTY = settings(max_examples=300, deadline=None, database=None)

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address


def _in(networks: tuple[Network, ...]) -> st.SearchStrategy[int]:
    """An address (as an integer) drawn from one of `networks`."""
    return st.sampled_from(networks).flatmap(
        lambda net: st.integers(int(net.network_address), int(net.broadcast_address))
    )


REFUSED_V4 = _in(targets.REFUSED_V4 + targets.METADATA_V4).map(V4)
LOOPBACK_V4 = _in(targets.LOOPBACK[:1]).map(V4)
REFUSED_V6 = _in(targets.REFUSED_V6 + targets.METADATA_V6).map(V6)
HARMLESS_V4 = _in(cidrs("10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,100.64.0.0/10,8.8.8.0/24")
                  ).map(V4).filter(lambda ip: ip != V4("10.244.0.5"))  # not the known pod


def _carrier(prefix: int, layout: tuple[int, ...]) -> Callable[[V4], V6]:
    """Writes the IPv4 bytes at `layout` positions of the IPv6 prefix (RFC 6052 2.2)."""

    def wrap(v4: V4) -> V6:
        packed = bytearray(prefix.to_bytes(16, "big"))
        for position, byte in zip(layout, v4.packed, strict=True):
            packed[position] = byte
        return V6(bytes(packed))

    return wrap


LAST_32 = (12, 13, 14, 15)
NAT64_LOCAL = int(V6("64:ff9b:1::"))
CARRIERS: dict[str, Callable[[V4], V6]] = {
    "mapped": _carrier(0xFFFF << 32, LAST_32),
    "compatible": _carrier(0, LAST_32),
    "nat64": _carrier(int(V6("64:ff9b::")), LAST_32),
    # RFC 6052 2.2, figure 1: the IPv4 bytes for each prefix length (byte 8 stays 0).
    "nat64-local/48": _carrier(NAT64_LOCAL, (6, 7, 9, 10)),
    "nat64-local/56": _carrier(NAT64_LOCAL, (7, 9, 10, 11)),
    "nat64-local/64": _carrier(NAT64_LOCAL, (9, 10, 11, 12)),
    "nat64-local/96": _carrier(NAT64_LOCAL, LAST_32),
    "6to4": lambda v4: V6((0x2002 << 112) | (int(v4) << 80) | 1),
}
# Within the local-use /48 the translator's prefix length is unknown, so the policy refuses
# when any reading is refused: most of it reads as 0.0.0.0/8 one way or another.
UNAMBIGUOUS = [name for name in CARRIERS if not name.startswith("nat64-local")]


def _dotted_tail(ip: V6) -> str:
    """The last 32 bits written as a dotted quad, after the exploded first six groups."""
    return ":".join(ip.exploded.split(":")[:6]) + ":" + str(V4(ip.packed[12:]))


def _short_dotted_tail(ip: V6) -> str:
    """As `_dotted_tail`, zero-compressed: `::ffff:127.0.0.1`, `64:ff9b::1.2.3.4`. The low
    32 bits set to ones first, so the compression falls within the first six groups."""
    return V6(int(ip) | 0xFFFFFFFF).compressed[: -len("ffff:ffff")] + str(V4(ip.packed[12:]))


SPELLINGS: dict[str, Callable[[V6], str]] = {
    "compressed": str,
    "exploded": lambda ip: ip.exploded,
    "unpadded": lambda ip: ":".join(f"{int(group, 16):x}" for group in ip.exploded.split(":")),
    "dotted": _dotted_tail,
    "short-dotted": _short_dotted_tail,
}


@st.composite
def refused_text(draw: st.DrawFn, v4: st.SearchStrategy[V4] = REFUSED_V4,
                 carriers: list[str] | None = None) -> str:
    """A refused address in any spelling: plain IPv4, or carried by any IPv6 form, spelled
    compressed, expanded or with a dotted tail, in either case."""
    address = draw(v4)
    carrier = draw(st.sampled_from([None, *(carriers or CARRIERS)]))
    if carrier is None:
        return str(address)
    ip = CARRIERS[carrier](address)
    text = SPELLINGS[draw(st.sampled_from(list(SPELLINGS)))](ip)
    return text.upper() if draw(st.booleans()) else text


REFUSED_TEXT = st.one_of(
    refused_text(),
    refused_text(LOOPBACK_V4),
    REFUSED_V6.flatmap(lambda ip: st.sampled_from([str(ip), ip.exploded, ip.exploded.upper()])),
)


def policy(*, allow_loopback: bool = False, pod_cidr: tuple[Network, ...] = EVERYWHERE
           ) -> targets.TargetPolicy:
    """A policy over listed (not operator-chosen) pods; by default every network is inside
    `--pod-cidr`, so only the class refusal can say no."""
    pods = StaticPodSource([Pod("p", "default", "10.244.0.5", 8888)])
    return targets.TargetPolicy(pods, allow_loopback=allow_loopback, pod_cidr=pod_cidr,
                                operator_chosen=False)


@PROPERTY
@given(REFUSED_V4, st.sampled_from(list(CARRIERS)))
def test_the_spellings_are_the_same_address(address: V4, carrier: str) -> None:
    """The strategies' own check: every spelling parses back to the address it wrote."""
    ip = CARRIERS[carrier](address)
    assert {targets.parse(spell(ip)) for spell in SPELLINGS.values()} == {ip}


def test_the_spellings_are_the_usual_ones() -> None:
    mapped = CARRIERS["mapped"](V4("127.0.0.1"))
    assert [spell(mapped) for spell in SPELLINGS.values()] == [
        "::ffff:7f00:1", "0000:0000:0000:0000:0000:ffff:7f00:0001", "0:0:0:0:0:ffff:7f00:1",
        "0000:0000:0000:0000:0000:ffff:127.0.0.1", "::ffff:127.0.0.1"]
    assert str(CARRIERS["nat64"](V4("169.254.169.254"))) == "64:ff9b::a9fe:a9fe"
    assert str(CARRIERS["nat64-local/48"](V4("127.0.0.1"))) == "64:ff9b:1:7f00:0:100::"


@PROPERTY
@given(REFUSED_TEXT)
def test_refused_classes_are_refused_in_every_form(text: str) -> None:
    with pytest.raises(ProxyError) as refusal:
        targets.pod_ip_hint(text, allow_loopback=False)
    assert (refusal.value.status, refusal.value.detail) == (400, targets.INVALID_ADDRESS)
    assert not policy().permits(text, text, 8888)


@PROPERTY
@given(st.one_of(refused_text(), REFUSED_V6.map(str)).filter(
    lambda text: targets.parse(text) != V6("::1")))  # ::0.0.0.1 is ::1
def test_the_loopback_flag_opens_loopback_only(text: str) -> None:
    assert not policy(allow_loopback=True).permits(text, text, 8888)


@PROPERTY
@given(refused_text(LOOPBACK_V4, UNAMBIGUOUS))
def test_loopback_in_every_form_is_allowed_with_the_flag(text: str) -> None:
    assert targets.pod_ip_hint(text, allow_loopback=True)
    assert policy(allow_loopback=True).permits(text, text, 8888)


@PROPERTY
@given(HARMLESS_V4, st.sampled_from(["mapped", None]))
def test_harmless_addresses_are_judged_by_what_they_carry(address: V4, carrier: str | None
                                                          ) -> None:
    """Not a policy that refuses everything: a mapped address is its IPv4 one, and it is
    used only inside --pod-cidr (an empty one opens nothing beyond the known pods)."""
    text = str(address) if carrier is None else str(CARRIERS[carrier](address))
    assert targets.pod_ip_hint(text, allow_loopback=False) == str(address)
    assert policy().permits(text, text, 8888)
    inside = cidrs(f"{address}/32")
    assert policy(pod_cidr=inside).permits(text, text, 8888)
    assert not policy(pod_cidr=cidrs("192.0.2.0/24")).permits(text, text, 8888)
    assert not policy(pod_cidr=()).permits(text, text, 8888)


def test_a_known_pod_is_permitted_without_pod_cidr_but_never_admitted_as_a_hint() -> None:
    """A known pod is reached through its own name; its address as a hint for another
    sandbox may be stale (the API gave it to a new sandbox), so it is not used."""
    narrow = policy(pod_cidr=cidrs("192.0.2.0/24"))
    assert narrow.permits("sb.default.svc.cluster.local", "::ffff:10.244.0.5", 8888)
    assert policy(pod_cidr=()).permits("sb.default.svc.cluster.local", "10.244.0.5", 8888)
    assert not narrow.admits_hint("10.244.0.5")
    assert not narrow.admits_hint("10.244.0.6")
    assert narrow.admits_hint("192.0.2.6")
    assert not policy(pod_cidr=cidrs("10.244.0.0/16")).admits_hint("10.244.0.5")
    assert policy(pod_cidr=cidrs("10.244.0.0/16")).admits_hint("10.244.0.6")
    assert not policy(pod_cidr=()).admits_hint("10.244.0.6")


@pytest.mark.parametrize("text", ["fe80::1%eth0", "::ffff:127.0.0.1%1", "10.0.0.1%0",
                                  "127.1", "0x7f.0.0.1", "2130706433", "::ffff:127.0.0.1/128",
                                  " 10.0.0.1"])
def test_zone_ids_and_loose_spellings_are_not_addresses(text: str) -> None:
    with pytest.raises(ProxyError) as refusal:
        targets.pod_ip_hint(text, allow_loopback=True)
    assert refusal.value.detail == targets.INVALID_FORMAT
    assert not policy(allow_loopback=True).permits(text, text, 8888)


def test_operator_chosen_hosts_are_always_permitted() -> None:
    """`--pods`/`--demo` entries are the operator's choice, a loopback sidecar included,
    on the port chosen."""
    pods = StaticPodSource([Pod("side", "default", "127.0.0.1", 9000),
                            Pod("named", "default", "localhost", 9000)])
    chosen = targets.TargetPolicy(pods, allow_loopback=False, pod_cidr=(), operator_chosen=True)
    assert chosen.permits("127.0.0.1", "127.0.0.1", 9000)
    assert chosen.permits("localhost", "::1", 9000)
    assert not chosen.permits("127.0.0.1", "127.0.0.1", 9090)  # not the port it chose
    assert not chosen.permits("127.0.0.2", "127.0.0.2", 9000)
    assert not chosen.permits("sb.default.svc.cluster.local", "127.0.0.1", 9000)


def test_no_refused_address_reaches_connect_through_a_real_router(
    start_pods: StartPods, start_router: StartRouter
) -> None:
    """The router over its real upstream client, every connect() seen by the audit hook:
    refused addresses in the header are a 400, as a pinned name's DNS answer a 502, and
    neither is connected to, while the pods on loopback (operator-chosen) still serve."""
    pods = start_pods(2)
    names: dict[str, str] = {}
    # A short connect timeout bounds how long a regression (a connect tried) takes to fail.
    client = start_router(static_config(pods, connect_timeout=1), names=names, loop="asyncio")
    pinned = functools.partial(client.get, "/")

    @settings(max_examples=150, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(REFUSED_TEXT)
    def check(text: str) -> None:
        names["sb.team.svc.cluster.local"] = text
        with recorded_connects() as connects:
            by_header = pinned(headers={"X-Sandbox-ID": "pod-0", "X-Sandbox-Pod-IP": text,
                                        "X-Sandbox-Port": str(pods[0].port)})
            by_name = pinned(headers={"X-Sandbox-ID": "sb", "X-Sandbox-Namespace": "team"})
        assert (by_header.status_code, by_header.json()["detail"]) == (400,
                                                                       targets.INVALID_ADDRESS)
        assert by_name.status_code == 502
        assert by_name.json() == {"detail": "The backend sandbox address is not allowed."}
        assert [c for c in connects if c[1] != client.base_url.port] == []

    check()
    assert sum(p.app.hits for p in pods) == 0
    with recorded_connects() as connects:
        assert pinned(headers={"X-Sandbox-ID": "pod-1"}).json()["pod"] == "pod-1"
    assert (pods[1].ip, pods[1].port) in connects  # the hook does see the router's connects
