"""The address policy: which addresses the router may connect to, decided in one place.

Every connection the router opens (a pool pod, a pinned pod from the cache, an
`X-Sandbox-Pod-IP` hint, the DNS answer of a pinned sandbox's name) passes `permits` in
`upstream.Client._open`, after any name lookup and before `connect()`. The header hint is
judged earlier as well (`pod_ip_hint`), so a refused address is a 400 before the body is
read, and `admits_hint` decides whether a harmless hint is used or ignored.

Why normalise first: Python's `ipaddress` predicates do not look inside an IPv6 address
that carries an IPv4 one, so `::ffff:127.0.0.1` is not `is_loopback` although the kernel
connects it to 127.0.0.1. Every such form is judged as the IPv4 address it carries.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from router.config import Network
from router.errors import ProxyError
from router.pods import PodSource, Snapshot

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _nets(*cidrs: str) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(cidr) for cidr in cidrs)


# -- refused whatever the options (loopback is separate: --allow-loopback-pod-ip) --

REFUSED_V4 = _nets(
    "0.0.0.0/8",  # RFC 791/1122 "this network", 0.0.0.0 (unspecified) included
    "169.254.0.0/16",  # RFC 3927 link-local: most clouds put their metadata service here
    "224.0.0.0/4",  # RFC 5771 multicast
    "255.255.255.255/32",  # RFC 919 limited broadcast
)
REFUSED_V6 = _nets(
    "::/128",  # RFC 4291 2.5.2 unspecified
    "fe80::/10",  # RFC 4291 2.5.6 link-local
    "ff00::/8",  # RFC 4291 2.7 multicast
)
LOOPBACK = _nets("127.0.0.0/8", "::1/128")  # RFC 1122 3.2.1.3, RFC 4291 2.5.3

METADATA_V4 = _nets(
    "169.254.169.254/32",  # AWS, GCP, Azure, OpenStack, DigitalOcean instance metadata
    "169.254.170.2/32",  # AWS ECS task metadata and credentials endpoint
    "169.254.170.23/32",  # AWS EKS Pod Identity Agent (credentials)
    "100.100.100.200/32",  # Alibaba Cloud ECS metadata
    "192.0.0.192/32",  # Oracle Cloud (OCI) legacy metadata
    "168.63.129.16/32",  # Azure WireServer (agent, health probes, DNS)
)
METADATA_V6 = _nets(
    "fd00:ec2::254/128",  # AWS IMDS over IPv6 (Nitro instances)
    "fd00:ec2::23/128",  # AWS EKS Pod Identity Agent over IPv6
    "fd20:ce::254/128",  # GCP metadata server on IPv6-only and dual-stack VMs
)

# -- IPv6 forms that carry an IPv4 address, judged as that address --

_MAPPED = ipaddress.ip_network("::ffff:0:0/96")  # RFC 4291 2.5.5.2 IPv4-mapped
_COMPATIBLE = ipaddress.ip_network("::/96")  # RFC 4291 2.5.5.1 (deprecated) IPv4-compatible
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052 2.1 well-known prefix
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215 local-use prefix
# RFC 6052 2.2: where the 32 IPv4 bits sit for each prefix length a translator may use
# inside the local-use /48 (byte 8, the "u" octet, is always skipped). Which length the
# operator's translator uses is unknown here, so every layout is judged.
_NAT64_LAYOUTS = ((6, 7, 9, 10), (7, 9, 10, 11), (9, 10, 11, 12), (12, 13, 14, 15))

INVALID_FORMAT = "Invalid target IP address format."
INVALID_ADDRESS = "Invalid target IP address."


def parse(text: str) -> Address:
    """An IP literal, without a zone id: `fe80::1%eth0` names an interface of this host,
    which no client has any business choosing. Raises ValueError."""
    if "%" in text:
        raise ValueError(f"zone id in {text!r}")
    return ipaddress.ip_address(text)


def carried(ip: Address) -> tuple[ipaddress.IPv4Address, ...]:
    """The IPv4 addresses an address stands for: itself, or what a mapped, compatible,
    NAT64 or 6to4 IPv6 address carries (none for plain IPv6)."""
    if isinstance(ip, ipaddress.IPv4Address):
        return (ip,)
    packed = ip.packed
    if ip in _MAPPED or ip in _NAT64 or (ip in _COMPATIBLE and int(ip) > 1):
        return (ipaddress.IPv4Address(packed[12:]),)  # :: and ::1 are not compatible forms
    if ip in _NAT64_LOCAL:
        return tuple(
            ipaddress.IPv4Address(bytes(packed[i] for i in layout)) for layout in _NAT64_LAYOUTS
        )
    if ip.sixtofour is not None:  # RFC 3056 2002:a.b.c.d::/48
        return (ip.sixtofour,)
    return ()


def refused(ip: Address, *, allow_loopback: bool) -> bool:
    """True for the classes no caller may reach: loopback (without the flag), link-local,
    multicast, unspecified, broadcast and cloud metadata, in any textual form."""
    if isinstance(ip, ipaddress.IPv6Address):
        if _within(ip, REFUSED_V6 + METADATA_V6):
            return True
        if not allow_loopback and _within(ip, LOOPBACK):
            return True
    return any(
        _within(v4, REFUSED_V4 + METADATA_V4) or (not allow_loopback and _within(v4, LOOPBACK))
        for v4 in carried(ip)
    )


def canonical(ip: Address) -> Address:
    """The address the socket really reaches: a mapped address is its IPv4 one (the kernel
    sends it as IPv4); every other form stays as written."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def pod_ip_hint(text: str, *, allow_loopback: bool) -> str:
    """Validate `X-Sandbox-Pod-IP`: bad syntax and refused classes are the agent-sandbox
    400s; otherwise the canonical address, still only a hint (`TargetPolicy.admits_hint`)."""
    try:
        ip = parse(text)
    except ValueError:
        raise ProxyError(400, INVALID_FORMAT) from None
    if refused(ip, allow_loopback=allow_loopback):
        raise ProxyError(400, INVALID_ADDRESS)
    return str(canonical(ip))


def _within(ip: Address, networks: Iterable[Network]) -> bool:
    return any(ip in network for network in networks)


@dataclass(frozen=True, slots=True)
class _Known:
    """What one pod snapshot vouches for: the canonical addresses of its pods (the pool and
    the sandbox index), and the (host, port) pairs the operator chose, which are always
    allowed."""

    snapshot: Snapshot | None
    addresses: frozenset[str]
    chosen: frozenset[tuple[str, int]]


class TargetPolicy:
    """The one decision about where the router may connect, for one process.

    `operator_chosen`: the pods come from `--pods`/`--demo`, so their host and port are
    allowed whatever they are (a sidecar on loopback); another port of that host is judged
    like any address (else `X-Sandbox-Port` would reach every port of the router's own
    loopback). Pods listed by the Kubernetes API are data a cluster user controls, and go
    through the class refusal like any other address.
    """

    def __init__(
        self,
        source: PodSource,
        *,
        allow_loopback: bool,
        pod_cidr: tuple[Network, ...],
        operator_chosen: bool,
    ) -> None:
        self._source = source
        self._allow_loopback = allow_loopback
        self._pod_cidr = pod_cidr
        self._operator_chosen = operator_chosen
        self._known = _Known(None, frozenset(), frozenset())
        self._canonical: dict[str, str | None] = {}  # pod IP -> its canonical form

    def admits_hint(self, address: str) -> bool:
        """Whether a valid, unrefused `X-Sandbox-Pod-IP` may be used for a sandbox the router
        does not know (a known one always goes to its indexed pod): only inside
        `--pod-cidr`, and never the address of a sandbox the router knows, which belongs to
        that sandbox now (the hint may be stale: the API gave the IP to another sandbox).
        Anything else is ignored, never a way out."""
        return (address not in self._current().addresses
                and self._in_cidr(ipaddress.ip_address(address)))

    def permits(self, host: str, address: str, port: int) -> bool:
        """Whether to connect to `address`, the IP literal `host` is or resolved to, on
        `port`: a pod the router knows (the pool, the sandbox index, an operator's host on
        the port chosen) or an address inside `--pod-cidr`, never a refused class. Nothing
        else: with `--pod-cidr` empty, a pinned name whose DNS answer is not a known pod
        (`kubernetes.default`, any other Service) is not connected to."""
        known = self._current()
        if (host, port) in known.chosen:
            return True
        try:
            ip = canonical(parse(address))
        except ValueError:
            return False
        if refused(ip, allow_loopback=self._allow_loopback):
            return False
        return str(ip) in known.addresses or self._in_cidr(ip)

    def _in_cidr(self, ip: Address) -> bool:
        return _within(ip, self._pod_cidr)

    def _current(self) -> _Known:
        """The known pods of the current snapshot, worked out once per snapshot (a
        snapshot is immutable; a new list is a new object)."""
        snapshot = self._source.snapshot()
        if snapshot is not self._known.snapshot:
            pods = snapshot.listed if snapshot is not None else ()
            # Parsing is the cost (5-10 us a pod): each IP is parsed once while it stays
            # listed. Measured for a change to a 10,000-sandbox index on a busy 2-core
            # machine: 9 ms of the event loop instead of 50-95.
            seen = self._canonical
            self._canonical = {
                pod.ip: seen[pod.ip] if pod.ip in seen else _canonical_text(pod.ip)
                for pod in pods
            }
            addresses = frozenset(a for a in self._canonical.values() if a is not None)
            chosen = (frozenset((pod.ip, pod.port) for pod in pods) if self._operator_chosen
                      else frozenset())
            self._known = _Known(snapshot, addresses, chosen)
        return self._known


def _canonical_text(host: str) -> str | None:
    """The canonical address of a host that is an IP literal; None for a name (a `--pods`
    entry may name a host instead)."""
    try:
        return str(canonical(parse(host)))
    except ValueError:
        return None
