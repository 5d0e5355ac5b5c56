"""Who may use the proxy: one `Authorizer` per `--authz-mode`, asked by the proxy for every
proxied request once its routing headers are read and before its body is (probes and
`/metrics` never get here).

The credential is `Authorization: Bearer <token>`. Every mode but allow-all consumes it: it
is taken out of the forwarded headers whatever the decision, because a sandbox holding the
caller's credential could replay it against the router, or (a Kubernetes token) the API.
No or an unreadable credential is 401 with `WWW-Authenticate: Bearer`; a credential that
does not reach this target is 403. The modes and their names are the Go agent-sandbox
router's (`bearer` is the Python router's static token), so flags move across.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from router.config import Config, ConfigError
from router.errors import ProxyError
from router.headers import Incoming, Pinned
from router.observe import Exchange

log = logging.getLogger("router.authz")

_CHALLENGE = ((b"www-authenticate", b"Bearer"),)
NO_CREDENTIAL = "Missing or invalid Authorization header."  # the Python router's words
BAD_CREDENTIAL = "Invalid token."
NOT_ALLOWED = "The token does not grant access to this sandbox."
POOL_PREFIX = "pool:"
"""Begins the name a pool request is authorized as (`pool_name`). No sandbox name (a DNS
label) holds a colon, so no sandbox's token is a pool token, nor a pool token any sandbox's:
when it was the bare pool name, a sandbox named `pool`, or named like the warm pool, was
the pool to a scoped token."""


def unauthenticated(detail: str = BAD_CREDENTIAL) -> ProxyError:
    return ProxyError(401, detail, _CHALLENGE)


def forbidden() -> ProxyError:
    return ProxyError(403, NOT_ALLOWED)


@dataclass(frozen=True, slots=True)
class Target:
    """What a request asks to reach: a sandbox, or for pool requests the pool by its name
    in `--namespace`; `pod_ip` tells whether the client also named an address."""

    namespace: str
    name: str
    pod_ip: bool


class Authorizer(Protocol):
    """One mode. `authorize` returns to allow, raises a `ProxyError` (401, 403, 503) to deny;
    `token` is None when the request carried no usable bearer credential."""

    async def authorize(self, token: str | None, target: Target) -> None: ...

    async def close(self) -> None: ...


def take_bearer(forward: list[tuple[str, str]]) -> str | None:
    """Remove every `Authorization` header from the forwarded ones and return the bearer
    token, or None when there is none, it is not `Bearer`, or there are several (which
    one a client meant is a guess not worth making)."""
    values = [value for name, value in forward if name == "authorization"]
    if not values:
        return None
    forward[:] = [(name, value) for name, value in forward if name != "authorization"]
    if len(values) != 1 or values[0][:7].lower() != "bearer ":  # the scheme is case-blind
        return None
    return values[0][7:].strip() or None


class Gate:
    """The proxy's one call: take the credential out, ask the authorizer about the target,
    record the decision on the exchange (for the metric and the access log)."""

    def __init__(self, authorizer: Authorizer, namespace: str, pool: str) -> None:
        self.authorizer = authorizer
        self._namespace = namespace
        self._pool = pool

    async def check(self, incoming: Incoming, pinned: Pinned | None, exchange: Exchange) -> None:
        token = take_bearer(incoming.forward)
        pod_ip = bool(incoming.sandbox_pod_ip)
        if pinned is None:
            target = Target(self._namespace, self._pool, pod_ip)
        else:
            target = Target(pinned.namespace, pinned.sandbox_id, pod_ip)
        try:
            await self.authorizer.authorize(token, target)
        except ProxyError:
            exchange.authz = "deny"
            raise
        exchange.authz = "allow"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- bearer: static tokens from a file --


def read_tokens(path: str) -> tuple[bytes, ...]:
    """The tokens of a token file: one per line, surrounding whitespace trimmed, blank
    lines and `#` comments skipped."""
    try:
        text = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"--authz-bearer-token-file {path}: {exc.strerror}") from None
    lines = (line.strip() for line in text.splitlines())
    return tuple(line for line in lines if line and not line.startswith(b"#"))


def _stamp(path: str) -> tuple[int, int, int, int]:
    stat = os.stat(path)
    return stat.st_ino, stat.st_dev, stat.st_size, stat.st_mtime_ns


class BearerTokens:
    """`--authz-mode bearer`: the token must be one of the file's. Each is compared in
    constant time, and all of them are, so the time taken tells nothing about which
    matched. The file is re-read when its inode, size or mtime changes (a Secret volume
    swaps a symlink, an editor renames): checked at most once a second, in a thread,
    prompted by a request; until the check is done, requests see the previous tokens.
    An unreadable file keeps the last tokens (logged); an empty one admits nobody."""

    CHECK_EVERY = 1.0

    def __init__(self, path: str) -> None:
        self._path = path
        self._stamp = _stamp(path)
        self._tokens = read_tokens(path)
        self._checked = time.monotonic()
        self._checking = False
        if not self._tokens:
            log.warning("--authz-bearer-token-file %s holds no token: every request is denied",
                        path)

    async def authorize(self, token: str | None, target: Target) -> None:
        self._maybe_reload()
        if token is None:
            raise unauthenticated(NO_CREDENTIAL)
        given = token.encode("latin-1")
        matched = False
        for known in self._tokens:
            matched |= hmac.compare_digest(known, given)
        if not matched:
            raise unauthenticated()

    async def close(self) -> None:
        return None

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if self._checking or now - self._checked < self.CHECK_EVERY:
            return
        self._checked, self._checking = now, True
        asyncio.get_running_loop().run_in_executor(None, self._reload)

    def _reload(self) -> None:
        """In a thread: re-read the file if it changed. The new tuple replaces the old in
        one assignment, so a request sees either set, never a mix."""
        try:
            stamp = _stamp(self._path)
            if stamp != self._stamp:
                self._tokens, self._stamp = read_tokens(self._path), stamp
                log.info("--authz-bearer-token-file %s re-read: %d tokens", self._path,
                         len(self._tokens))
        except (OSError, ConfigError) as exc:
            log.warning("--authz-bearer-token-file %s: cannot re-read, keeping %d tokens: %s",
                        self._path, len(self._tokens), exc)
        finally:
            self._checking = False


# -- scoped-token: HMAC tokens bound to one sandbox, the Go router's format --

SCOPED_VERSION = "v1"
SCOPED_CONTEXT = b"agent-sandbox/scoped-token/v1."
"""Signed before the payload, so no other use of the same secret yields a valid token."""
MIN_SECRET_BYTES = 32
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")


def read_secret(path: str) -> bytes:
    """The scoped-token secret: the file's bytes with surrounding whitespace trimmed (a
    mounted Secret's trailing newline is not part of the key), at least 32 bytes."""
    try:
        secret = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"--authz-scoped-token-secret-file {path}: {exc.strerror}") from None
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(f"--authz-scoped-token-secret-file {path}: the secret must be at "
                          f"least {MIN_SECRET_BYTES} bytes after trimming, got {len(secret)}")
    return secret


def scoped_signature(secret: bytes, payload: str) -> bytes:
    return hmac.new(secret, SCOPED_CONTEXT + payload.encode("ascii"), hashlib.sha256).digest()


def _raw_base64url(text: str) -> bytes | None:
    """base64url without padding, as Go's `RawURLEncoding` decodes it: `=` or any other
    character outside the alphabet is an error, not something to skip."""
    if not _BASE64URL.fullmatch(text) or len(text) % 4 == 1:
        return None
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class Claims:
    namespace: str
    name: str
    exp: int


def _claims(payload: bytes) -> Claims | None:
    """The JSON claims `{"ns","name","exp"}` as Go's `json.Unmarshal` into
    `{string, string, int64}` reads them: unknown keys ignored, a missing key is the zero
    value and so is `null`, a value of the wrong type (`exp` 1.5, `ns` 3) fails."""
    try:
        data: Any = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    namespace, name, exp = (default if data.get(key) is None else data[key]
                            for key, default in (("ns", ""), ("name", ""), ("exp", 0)))
    if not (isinstance(namespace, str) and isinstance(name, str)):
        return None
    if not isinstance(exp, int) or isinstance(exp, bool) or not -2**63 <= exp < 2**63:
        return None
    return Claims(namespace, name, exp)


class ScopedTokens:
    """`--authz-mode scoped-token`: `v1.<payload>.<signature>`, both base64url without
    padding; payload the JSON claims `{"ns","name","exp"}`, signature HMAC-SHA256 with the
    secret over `agent-sandbox/scoped-token/v1.` and the payload text. Valid while
    now < exp (unix seconds). A good token for another target is 403, and so is any
    `X-Sandbox-Pod-IP` with it: that header picks the address after authorization, so it
    would carry a token for one sandbox to any other."""

    def __init__(self, secret: bytes, clock: Callable[[], float] = time.time) -> None:
        self._secret = secret
        self._clock = clock

    def verify(self, token: str, now: float) -> Claims | None:
        """The claims of a token signed with our secret and unexpired at `now`, else None.
        The signature is checked before the payload is decoded, as the Go router does."""
        version, _, rest = token.partition(".")
        payload, dot, encoded = rest.partition(".")
        if version != SCOPED_VERSION or not dot:
            return None
        signature = _raw_base64url(encoded)
        if signature is None or not payload.isascii():
            return None
        if not hmac.compare_digest(signature, scoped_signature(self._secret, payload)):
            return None
        decoded = _raw_base64url(payload)
        claims = _claims(decoded) if decoded is not None else None
        if claims is None or int(now) >= claims.exp:  # exp is exclusive
            return None
        return claims

    async def authorize(self, token: str | None, target: Target) -> None:
        if token is None:
            raise unauthenticated(NO_CREDENTIAL)
        claims = self.verify(token, self._clock())
        if claims is None:
            raise unauthenticated()
        if target.pod_ip or (claims.namespace, claims.name) != (target.namespace, target.name):
            raise forbidden()

    async def close(self) -> None:
        return None


def pool_name(config: Config) -> str:
    """The name a pool request is authorized as: `pool:` and the `--warm-pool` the router
    lists, or `pool:` alone for a static pool or one chosen by `--selector`."""
    return POOL_PREFIX + (config.warm_pool if config.warm_pool and not config.static else "")


def check_files(config: Config) -> None:
    """Read what the mode needs once, so a missing file or a short secret stops start-up
    with one line (exit 2) instead of failing in the server's start."""
    if config.authz_bearer_token_file is not None:
        read_tokens(config.authz_bearer_token_file)
    if config.authz_scoped_token_secret_file is not None:
        read_secret(config.authz_scoped_token_secret_file)
