"""Who a client is, for limits kept per client (`--upgrade-max-per-client`): the peer's
address, or, when the peer is a proxy the operator trusts (`--trusted-proxy-cidrs`), the
right-most `X-Forwarded-For` hop that is not one of those proxies. Hops left of it could
be anything the client wrote, so they are never read; with no trusted proxy configured,
`X-Forwarded-For` is never read at all. One client is then one address (`client_key`).
The same trust decides whether a request's `X-Forwarded-Proto`, `X-Forwarded-Host`,
`Forwarded` and `X-Real-IP` reach the pod (router/headers.py)."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from router.config import Network


def is_trusted_peer(peer: str, trusted: Sequence[Network]) -> bool:
    """Whether the peer is one of the operator's proxies; no address is parsed when none
    is configured (the default, and every request asks)."""
    return bool(trusted) and _is_trusted(peer, trusted)


def client_address(peer: str, raw: Sequence[tuple[bytes, bytes]],
                   trusted: Sequence[Network]) -> str:
    if not is_trusted_peer(peer, trusted):
        return peer
    hops = [hop.strip() for name, value in raw if name.lower() == b"x-forwarded-for"
            for hop in value.decode("latin-1").split(",")]
    address = peer
    for hop in reversed(hops):
        address = hop
        if not _is_trusted(hop, trusted):
            break
    return address


def client_key(address: str) -> str:
    """What a client is counted as: its address in one spelling (`2001:DB8:0::1` is
    `2001:db8::1`; an IPv4-mapped IPv6 address, a dual-stack listener's view of an IPv4
    client, is its IPv4), anything else (an `X-Forwarded-For` hop that is no address) as
    written. Not an IPv6 /64, as rate limits on the internet often count: in an IPv6
    cluster the pods of one node share a /64 (the controller manager's default node mask),
    and each is a client of its own. Many addresses together are `--upgrade-max`'s."""
    ip = _ip(address)
    return address if ip is None else str(ip)


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """`address` parsed, an IPv4-mapped IPv6 one as its IPv4; None if it is none. A port
    is no part of it: some proxies write their `X-Forwarded-For` hops `203.0.113.7:50001`
    or `[2001:db8::1]:443`, and each connection would otherwise be a client of its own."""
    if address.startswith("["):
        address = address[1:].partition("]")[0]
    elif address.count(":") == 1:
        address = address.partition(":")[0]
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _is_trusted(address: str, trusted: Sequence[Network]) -> bool:
    ip = _ip(address)
    # Not an address (a typo, "unknown"): a hop nobody vouches for.
    return ip is not None and any(ip in network for network in trusted)
