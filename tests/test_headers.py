"""The header contract in isolation: what is forwarded, and the X-Sandbox-Timeout rule."""

from __future__ import annotations

import pytest

from router.headers import read_request, response_headers, upstream_timeout, websocket_only


def scope(*headers: tuple[bytes, bytes]) -> dict[str, object]:
    return {"headers": list(headers), "client": ("198.51.100.7", 5000), "scheme": "http"}


def test_names_listed_in_connection_are_dropped_case_insensitively():
    incoming = read_request(scope((b"connection", b"Upgrade, X-Foo"), (b"x-foo", b"1"),
                                  (b"upgrade", b"h2c"), (b"x-bar", b"2")), trusted_peer=False)
    forwarded = dict(incoming.forward)
    assert "x-foo" not in forwarded and "upgrade" not in forwarded
    assert forwarded["x-bar"] == "2"


def test_every_one_of_many_connection_tokens_is_dropped_from_an_answer():
    """12,000 tokens (a pod's head within its limits): each named header goes, however
    many, in any `Connection` header; the others stay."""
    names = [b"x-%x" % i for i in range(12000)]
    raw = [(b"connection", b", ".join(names[:6000])), (b"connection", b",".join(names[6000:])),
           (b"x-5", b"a"), (b"x-2edf", b"b"), (b"x-kept", b"c"), (b"keep-alive", b"5")]
    assert response_headers(raw, []) == [(b"x-kept", b"c")]


def test_proxy_and_every_proxy_dash_name_are_dropped_both_ways_and_no_other():
    names = [b"proxy", b"proxy-", b"proxy-status", b"proxy-z", b"proxy.x", b"proxyz",
             b"prox", b"proxz", b"x-proxy"]
    raw = [(name, b"1") for name in names]
    kept = [b"proxy.x", b"proxyz", b"prox", b"proxz", b"x-proxy"]
    assert [name for name, _ in response_headers(raw, [])] == kept
    forward = read_request(scope(*raw), trusted_peer=False).forward
    assert [name.encode() for name, _ in forward if name.encode() in names] == kept


def test_an_unsafe_request_id_is_replaced():
    incoming = read_request(scope((b"x-request-id", b"has space")), trusted_peer=False)
    assert incoming.request_id != "has space"
    assert len(incoming.request_id) == 32


def test_sandbox_timeout_only_shortens():
    assert upstream_timeout(None, 180) == 180
    assert upstream_timeout("30", 180) == 30
    assert upstream_timeout("600", 180) == 180
    assert upstream_timeout("0", 180) == 180
    assert upstream_timeout("-5", 180) == 180
    assert upstream_timeout("nan", 180) == 180
    assert upstream_timeout("soon", 180) == 180


def test_response_keeps_repeats_and_replaces_the_routers_own_headers():
    # Names lower-case, as `Response` keeps them (the mixed-case pod: test_hostile_pod.py).
    raw = ((b"set-cookie", b"a=1"), (b"set-cookie", b"b=2"), (b"x-request-id", b"pod"),
           (b"transfer-encoding", b"chunked"))
    headers = response_headers(raw, [(b"x-request-id", b"mine")])
    assert headers == [(b"set-cookie", b"a=1"), (b"set-cookie", b"b=2"),
                       (b"x-request-id", b"mine")]


def test_a_bodyless_answer_loses_its_content_length() -> None:
    raw = [(b"etag", b'"x"'), (b"content-length", b"1234")]
    assert response_headers(raw, [], 304) == [(b"etag", b'"x"')]
    assert response_headers(raw, [], 200) == raw


@pytest.mark.parametrize(
    ("upgrade", "websocket"),
    [
        ([b"websocket"], True),
        ([b"WebSocket"], True),
        ([b"  websocket "], True),
        ([b"websocket", b"websocket"], True),  # the same, in two headers
        ([b"websocket, foo"], False),
        ([b"foo"], False),
        ([], False),
    ],
)
def test_a_101_websocket_only_only_when_every_upgrade_token_says_so(
    upgrade: list[bytes], websocket: bool
) -> None:
    """Which tunnels have no half-close (router/tunnel.py): those the pod switched to
    WebSocket alone, however it spelt it."""
    raw = [(b"connection", b"upgrade"), *((b"upgrade", value) for value in upgrade)]
    assert websocket_only(raw) is websocket
