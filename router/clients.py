"""Who a client is, for limits kept per client (`--upgrade-max-per-client`): the peer's
address, or, when the peer is a proxy the operator trusts (`--trusted-proxy-cidrs`), the
right-most `X-Forwarded-For` hop that is not one of those proxies. Hops left of it could
be anything the client wrote, so they are never read; with no trusted proxy configured,
`X-Forwarded-For` is never read at all. One client is then an IPv4 address or an IPv6
/64 (`client_key`)."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from router.config import Network

IPV6_CLIENT_PREFIX = 64
"""An IPv6 client is its /64: a host commonly has a whole one (SLAAC, privacy addresses,
a delegated prefix), so counting each /128 apart would let one host take any number of
slots. In an IPv6 cluster the pods of one node often share one (the controller manager's
default node mask is /64): they are then one client."""


def client_address(peer: str, raw: Sequence[tuple[bytes, bytes]],
                   trusted: Sequence[Network]) -> str:
    if not trusted or not _is_trusted(peer, trusted):
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
    """What a client is counted as: an IPv4 address as it is (an IPv4-mapped IPv6 one as
    its IPv4: a dual-stack listener's view of an IPv4 client), an IPv6 one as its /64, and
    anything else (an `X-Forwarded-For` hop that is no address) as written."""
    ip = _ip(address)
    if ip is None:
        return address
    if isinstance(ip, ipaddress.IPv4Address):
        return str(ip)
    return str(ipaddress.IPv6Network((ip, IPV6_CLIENT_PREFIX), strict=False))


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """`address` parsed, an IPv4-mapped IPv6 one as its IPv4; None if it is none."""
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
