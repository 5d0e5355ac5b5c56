"""Who a client is, for limits kept per client (`--upgrade-max-per-client`): the peer's
address, or, when the peer is a proxy the operator trusts (`--trusted-proxy-cidrs`), the
right-most `X-Forwarded-For` hop that is not one of those proxies. Hops left of it could
be anything the client wrote, so they are never read; with no trusted proxy configured,
`X-Forwarded-For` is never read at all."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from router.config import Network


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


def _is_trusted(address: str, trusted: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False  # not an address (a typo, "unknown"): a hop nobody vouches for
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in trusted)
