"""The header contract: `X-Sandbox-*` routing headers, hop-by-hop rules, forwarding headers.

Compatibility with the agent-sandbox routers is deliberate: the same header names, the same
validation and the same 400 messages, so existing clients and SDKs keep working unchanged.

Header names reach this module lower-case, and it relies on that rather than lower them
again (up to four times per header: 1.2% of a small GET's instructions): a
request's as ASGI requires of the server (uvicorn's parser callback lowers them), an
answer's as `router.connection.Response` keeps them. Values are compared as sent, or
lowered where their tokens are case-blind.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from random import getrandbits

from router.asgi import Scope
from router.errors import ProxyError
from router.sandbox_ids import is_dns_label
from router.targets import pod_ip_hint

# RFC 9110 7.6.1, and `Proxy` with every `Proxy-*` name (`PROXY_PREFIX`): never forwarded
# in either direction. `Proxy-*` are a proxy's own (`Proxy-Authorization`, the legacy
# `Proxy-Connection`); `Proxy` is no header of HTTP's, but a CGI server makes it HTTP_PROXY,
# the proxy of the sandbox's own outgoing requests (httpoxy, CVE-2016-5385).
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        # Not hop-by-hop in RFC 9110, but answered on this hop: uvicorn sends the client its
        # 100 Continue; forwarded, it would make the upstream client wait for another one.
        b"expect",
    }
)
SANDBOX_PREFIX = b"x-sandbox-"
PROXY_PREFIX = b"proxy-"
# The names from `proxy-` up to, not including, `proxy.` are those starting `proxy-`: two
# comparisons find them at a third of `startswith`'s cost, per header of every answer.
_PROXY_AFTER = b"proxy."
_DROPPED_PREFIXES = (SANDBOX_PREFIX, PROXY_PREFIX)  # one test per request header for both
# What a proxy says of its client besides `X-Forwarded-For` (which is appended to): taken
# only from a peer in --trusted-proxy-cidrs (router/clients.py), else dropped, and the
# router's own `X-Forwarded-Proto` and `-Host` sent instead. Every other `X-Forwarded-*`
# is a proxy's word too (`-Port`, `-Prefix`, `-Server`, Envoy's `-Client-Cert` naming the
# client's certificate): `_vouched` takes the family, not a list a new one would miss.
_VOUCHED = frozenset({
    b"forwarded", b"x-real-ip", b"x-forwarded",
    # Other proxies' and CDNs' word for the client's address, which frameworks' client-IP
    # helpers read before the socket's (Express's request-ip, django-ipware, ...).
    b"x-client-ip", b"true-client-ip", b"cf-connecting-ip", b"fastly-client-ip",
    b"x-cluster-client-ip", b"x-original-forwarded-for",
})
_VOUCHED_PREFIX = b"x-forwarded-"  # `-for` is read before this is tested
# The request headers the router strips or sets. WSGI and CGI servers read `X_Real_IP` as
# `X-Real-IP` (both HTTP_X_REAL_IP), so a name with `_` that reads as one of these, `_`
# taken for `-`, is dropped too (`_spells_own`); any other passes, as through the
# agent-sandbox routers (nginx drops them all by default). Names with no `-` (`Host`,
# `Forwarded`, `Authorization`) have no other spelling.
_OWN = HOP_BY_HOP | _VOUCHED | {b"content-length", b"x-request-id"}
_OWN_PREFIXES = (SANDBOX_PREFIX, PROXY_PREFIX, b"x-forwarded-")
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,200}")
_PORT = re.compile(r"[0-9]{1,5}")
# The routing headers: the `Incoming` field each fills, and the name a 400 shows.
_ROUTING = {
    b"x-sandbox-id": ("sandbox_id", "X-Sandbox-ID"),
    b"x-sandbox-namespace": ("sandbox_namespace", "X-Sandbox-Namespace"),
    b"x-sandbox-port": ("sandbox_port", "X-Sandbox-Port"),
    b"x-sandbox-pod-ip": ("sandbox_pod_ip", "X-Sandbox-Pod-IP"),
    b"x-sandbox-timeout": ("sandbox_timeout", "X-Sandbox-Timeout"),
}
# A request whose authority or framing is ambiguous: answered, and its connection closed.
_CLOSE = ((b"connection", b"close"),)
MISSING_HOST = ProxyError(400, "Missing Host header.", _CLOSE)
REPEATED_HOST = ProxyError(400, "Repeated Host header.", _CLOSE)
UNSUPPORTED_CODING = ProxyError(501, "Unsupported Transfer-Encoding: only chunked is.", _CLOSE)
UPGRADE_WITH_BODY = ProxyError(400, "An upgrade request cannot carry a body.", _CLOSE)


@dataclass(slots=True)
class Incoming:
    """Everything the router reads from a request's headers, gathered in one pass."""

    forward: list[tuple[str, str]]
    request_id: str
    content_length: int | None
    sandbox_id: str | None = None
    sandbox_namespace: str | None = None
    sandbox_port: str | None = None
    sandbox_pod_ip: str | None = None
    sandbox_timeout: str | None = None
    refused: ProxyError | None = None  # the request breaks a rule: answered with this
    framed: bool = False  # a `Content-Length` or `Transfer-Encoding` header, as received

    @property
    def bodiless(self) -> bool:
        """Neither `Content-Length` nor `Transfer-Encoding`: no body (RFC 9112 6.3). Not
        `content_length is None`: the parser reads a body by a length the router does not
        take (`5 `, or one `Connection` names), which is streamed, not dropped."""
        return not self.framed


@dataclass(frozen=True, slots=True)
class Pinned:
    """A validated pinned target; `port` and `pod_ip` are None when the client left them out."""

    sandbox_id: str
    namespace: str
    port: int | None
    pod_ip: str | None


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """The hop-by-hop names, and those `Connection` names. No new set for the usual
    `keep-alive` (this runs twice for every request, #13); else one set grown in place:
    a set copied per token made a head of 12,000 tokens a 1.4 s turn of the event loop."""
    extra: set[bytes] | None = None
    for name, value in headers:
        if name == b"connection":
            for token in value.split(b","):
                token = token.strip().lower()
                if token not in HOP_BY_HOP:
                    if extra is None:
                        extra = set(HOP_BY_HOP)
                    extra.add(token)
    return HOP_BY_HOP if extra is None else frozenset(extra)


def read_request(scope: Scope, *, trusted_peer: bool) -> Incoming:
    """Split the client's headers into routing values and the headers sent upstream.

    Dropped: hop-by-hop headers (`Proxy-*` included) and those named in `Connection`,
    `Host` and `Content-Length` (the upstream client sets both), every `X-Sandbox-*`
    header, `_` spellings of those the router strips or sets (`_OWN`), and, unless the
    peer is a `trusted_peer` proxy, what only a proxy may say (`_VOUCHED`, and every
    `X-Forwarded-*` but `-For`, which is appended to).
    `Host`, `Transfer-Encoding` and the routing headers are judged as received, before
    `Connection` drops anything: a token there changes forwarding, never routing. A
    request breaking RFC 9112's rules gets `refused` (missing or repeated `Host` on
    HTTP/1.1, a coding other than chunked), as does a repeated routing header.
    """
    raw: list[tuple[bytes, bytes]] = scope["headers"]
    dropped = _connection_tokens(raw)
    forward: list[tuple[str, str]] = []
    incoming = Incoming(forward=forward, request_id="", content_length=None)
    forwarded_for = forwarded_proto = forwarded_host = None
    host = None
    for name, value in raw:
        if name.startswith(_DROPPED_PREFIXES):
            if name.startswith(SANDBOX_PREFIX):
                _read_sandbox_header(incoming, name, value)
            continue
        if name == b"host":
            if host is not None:
                _refuse(incoming, REPEATED_HOST)
            host = value.decode("latin-1")
            continue
        if name == b"transfer-encoding":  # the parser took any list ending in chunked
            incoming.framed = True
            if any(coding.strip().lower() != b"chunked" for coding in value.split(b",")):
                _refuse(incoming, UNSUPPORTED_CODING)
            continue
        if name == b"content-length":
            incoming.framed = True  # a body follows, whatever `Connection` says (`bodiless`)
        # 95 is `_`: an int is found by one memchr, `b"_"` by a substring search at 9x its cost.
        if name in dropped or (95 in name and _spells_own(name)):
            continue
        text = value.decode("latin-1")
        if name == b"x-forwarded-for":
            forwarded_for = text if forwarded_for is None else f"{forwarded_for}, {text}"
            continue
        if name == b"x-request-id":
            if _REQUEST_ID.fullmatch(text):
                incoming.request_id = text
            continue
        if name == b"content-length":  # the upstream client frames the body itself
            incoming.content_length = int(text) if text.isdigit() else None
            continue
        if name in _VOUCHED or name.startswith(_VOUCHED_PREFIX):
            if not trusted_peer:
                continue
            if name == b"x-forwarded-proto":
                forwarded_proto = text
            elif name == b"x-forwarded-host":
                forwarded_host = text
        forward.append((name.decode("latin-1"), text))

    if host is None and scope.get("http_version") == "1.1":
        _refuse(incoming, MISSING_HOST)
    client = scope.get("client")
    if client:
        address = client[0]
        forwarded_for = address if forwarded_for is None else f"{forwarded_for}, {address}"
    if forwarded_for is not None:
        forward.append(("x-forwarded-for", forwarded_for))
    if forwarded_proto is None:
        forward.append(("x-forwarded-proto", scope.get("scheme", "http")))
    if forwarded_host is None and host is not None:
        forward.append(("x-forwarded-host", host))
    if not incoming.request_id:
        # Unique, not secret: 128 random bits without the system call uuid4 makes.
        incoming.request_id = f"{getrandbits(128):032x}"
    forward.append(("x-request-id", incoming.request_id))
    return incoming


def _spells_own(name: bytes) -> bool:
    """Whether a name with `_` reads, `_` taken for `-`, as a header the router strips or
    sets (`_OWN`): `X_Forwarded_For`, `X-Sandbox_ID`, `Proxy_Authorization`."""
    alias = name.replace(b"_", b"-")
    return alias in _OWN or alias.startswith(_OWN_PREFIXES)


def _refuse(incoming: Incoming, error: ProxyError) -> None:
    if incoming.refused is None:  # the first broken rule is the one reported
        incoming.refused = error


def _read_sandbox_header(incoming: Incoming, name: bytes, value: bytes) -> None:
    """One routing header; a second of the same name is refused, never picked from."""
    routing = _ROUTING.get(name)
    if routing is None:
        return
    field, shown = routing
    if getattr(incoming, field) is not None:
        _refuse(incoming, ProxyError(400, f"Repeated {shown} header."))
        return
    text = value.decode("latin-1")
    # The port is judged as sent (`parse_pinned`): no blank is taken off it.
    setattr(incoming, field, text if field == "sandbox_port" else text.strip())


def parse_pinned(incoming: Incoming, *, allow_loopback: bool) -> Pinned:
    """Validate the pinned-routing headers exactly as the agent-sandbox routers do."""
    sandbox_id = incoming.sandbox_id or ""
    if not is_dns_label(sandbox_id):
        raise ProxyError(400, "Invalid sandbox ID format.")
    namespace = incoming.sandbox_namespace or "default"
    if not is_dns_label(namespace):
        raise ProxyError(400, "Invalid namespace format.")
    port = None
    if incoming.sandbox_port:
        # Plain ASCII digits only: int() would also take "+19402", "19_402", " 1" and "٣".
        text = incoming.sandbox_port
        port = int(text) if _PORT.fullmatch(text) else 0
        if not 1 <= port <= 65535:
            raise ProxyError(400, "Invalid port format.")
    pod_ip = None
    if incoming.sandbox_pod_ip:
        pod_ip = pod_ip_hint(incoming.sandbox_pod_ip, allow_loopback=allow_loopback)
    return Pinned(sandbox_id, namespace, port, pod_ip)


def upstream_timeout(raw: str | None, cap: float) -> float:
    """`X-Sandbox-Timeout` may shorten the upstream timeout, never lengthen it; an invalid
    value falls back to the cap rather than failing a request the SDK sent in good faith."""
    if not raw:
        return cap
    try:
        value = float(raw)
    except ValueError:
        return cap
    if not 0 < value < cap:
        return cap
    return value


def response_headers(
    raw: Sequence[tuple[bytes, bytes]], extra: list[tuple[bytes, bytes]], status: int = 200
) -> list[tuple[bytes, bytes]]:
    """The sandbox's headers minus hop-by-hop ones (`Proxy-*` included), repeated headers
    (`Set-Cookie`) kept, followed by the router's own (`X-Request-ID`, and the serving pod
    on pool requests).

    A 204 or 304 has no body, whatever `Content-Length` says (a 304 may state the length
    of the 200 it stands for); the header is dropped there, as the server side would
    otherwise wait for that many bytes."""
    dropped = _connection_tokens(raw)
    if status in (204, 304):
        dropped = dropped | {b"content-length"}
    own = {name for name, _ in extra}
    kept = [(name, value) for name, value in raw
            if name not in dropped and name not in own
            and not PROXY_PREFIX <= name < _PROXY_AFTER]
    kept.extend(extra)
    return kept


def upgrade_protocol(raw: Sequence[tuple[bytes, bytes]]) -> str | None:
    """The `Upgrade` a request asks for, if `Connection` names it too; else None."""
    connection = {token.strip().lower() for name, value in raw if name == b"connection"
                  for token in value.split(b",")}
    if b"upgrade" not in connection:
        return None
    values = [value for name, value in raw if name == b"upgrade"]
    return b", ".join(values).decode("latin-1") if values else None


def websocket_only(raw: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether a handshake or a 101 (its headers, names lower-cased) names WebSocket alone:
    every token of its `Upgrade` headers, however many, is `websocket`."""
    tokens = {token.strip().lower() for name, value in raw if name == b"upgrade"
              for token in value.split(b",")}
    return tokens == {b"websocket"}


def declares_body(raw: Sequence[tuple[bytes, bytes]]) -> bool:
    """Whether a head announces a body: any `Transfer-Encoding`, or a non-zero
    `Content-Length`. An upgrade request must not (`UPGRADE_WITH_BODY`): the parser stops
    at the end of its head, so its body could only reach the pod unframed, as tunnel bytes."""
    return any(
        name == b"transfer-encoding"
        or (name == b"content-length" and value.strip().lstrip(b"0") != b"")
        for name, value in raw
    )


def upgrade_request(forward: list[tuple[str, str]], protocol: str) -> list[tuple[str, str]]:
    """The headers of an upgrade handshake sent to a pod: the client's, less `Origin`
    (the router rewrites `Host`, so a browser's `Origin` would fail the sandbox's own
    same-origin check), plus the two hop-by-hop headers that ask for the upgrade."""
    kept = [(name, value) for name, value in forward if name != "origin"]
    kept.append(("connection", "upgrade"))
    kept.append(("upgrade", protocol))
    return kept


def switching_head(raw: Sequence[tuple[bytes, bytes]], extra: list[tuple[bytes, bytes]]) -> bytes:
    """The 101 the client is sent: the pod's headers (`response_headers`), the router's,
    and the pod's `Connection: upgrade` and `Upgrade`, which are hop-by-hop but what this
    answer is about."""
    upgrade = [(b"upgrade", value) for name, value in raw if name == b"upgrade"]
    lines = [b"HTTP/1.1 101 Switching Protocols\r\n"]
    for name, value in [*response_headers(raw, extra, 101), (b"connection", b"upgrade"),
                        *upgrade]:
        lines.append(b"%s: %s\r\n" % (name, value))
    lines.append(b"\r\n")
    return b"".join(lines)
