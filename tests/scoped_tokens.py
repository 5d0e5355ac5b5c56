"""Scoped tokens minted from the wire format alone (not with `router.authz`), so the tests
hold the router to the format, not to itself: `v1.<payload>.<signature>`, payload the
base64url (no padding) of the JSON claims `{"ns","name","exp"}` as Go's `json.Marshal`
writes them, signature the base64url (no padding) HMAC-SHA256 with the secret over
`agent-sandbox/scoped-token/v1.` followed by the payload text."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign(secret: bytes, payload: str) -> str:
    mac = hmac.new(secret, b"agent-sandbox/scoped-token/v1." + payload.encode(), hashlib.sha256)
    return b64(mac.digest())


def mint(secret: bytes, namespace: str, name: str, exp: int) -> str:
    claims = json.dumps({"ns": namespace, "name": name, "exp": exp}, separators=(",", ":"))
    payload = b64(claims.encode())
    return f"v1.{payload}.{sign(secret, payload)}"
