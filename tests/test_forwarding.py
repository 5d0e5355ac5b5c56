"""What crosses the router: headers, paths, methods and bodies, byte for byte."""

from __future__ import annotations

import gzip
import http.client
import ipaddress
import json
import socket

import httpx
import pytest

from tests import rawpod
from tests.conftest import StartPods, StartRawPods, StartRouter, static_config
from tests.rawpod import RawPod


def raw_request(url: str, request: bytes) -> bytes:
    """Send bytes exactly as written (no client normalisation) and read the whole answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_raw_path_and_query_pass_as_received(start_pods: StartPods, start_router: StartRouter):
    pods = start_pods(1)
    client = start_router(static_config(pods))
    answer = raw_request(
        str(client.base_url).rstrip("/"),
        b"GET /a/../b%2Fc/./d?x=%2F&y=a+b HTTP/1.1\r\nHost: r\r\nConnection: close\r\n\r\n",
    )
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body["raw_path"] == "/a/../b%2Fc/./d"
    assert body["query"] == "x=%2F&y=a+b"


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
def test_every_method_is_proxied(
    start_pods: StartPods, start_router: StartRouter, method: str
):
    pods = start_pods(1)
    client = start_router(static_config(pods))
    response = client.request(method, "/m")
    assert response.status_code == 200
    assert response.json()["method"] == method


def test_head_is_proxied_without_a_body(start_pods: StartPods, start_router: StartRouter):
    pods = start_pods(1)
    client = start_router(static_config(pods))
    response = client.head("/m")
    assert response.status_code == 200
    assert response.content == b""
    assert pods[0].app.seen[0].method == "HEAD"


def test_hop_by_hop_and_routing_headers_are_not_forwarded(
    start_pods: StartPods, start_router: StartRouter
):
    pods = start_pods(1)
    client = start_router(static_config(pods))
    client.get(
        "/",
        headers={
            "Connection": "keep-alive, X-Drop-Me",
            "X-Drop-Me": "1",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Expect": "100-continue",
            "Proxy-Authorization": "Basic eA==",
            "X-Sandbox-Namespace": "ignored",
            "X-Sandbox-Timeout": "10",
            "X-Custom": "kept",
            "Authorization": "Bearer sandbox-token",
        },
    )
    seen = pods[0].app.seen[0]
    names = {name for name, _ in seen.headers}
    assert not names & {
        "x-drop-me", "keep-alive", "te", "proxy-authorization", "connection", "expect"
    }
    assert not any(name.startswith("x-sandbox-") for name in names)
    assert seen.header("x-custom") == "kept"
    assert seen.header("authorization") == "Bearer sandbox-token"
    assert seen.header("host") == f"{pods[0].ip}:{pods[0].port}"


def header_lines(message: bytes) -> list[bytes]:
    """The header lines of a message's head, as they came on the wire."""
    return message.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]


def exchange(client: httpx.Client, pod: RawPod, headers: bytes) -> tuple[list[bytes], list[bytes]]:
    """Send a GET with `headers` (raw lines) as written: the header lines of the answer,
    and of the request the raw pod read."""
    answer = raw_request(str(client.base_url).rstrip("/"), b"GET / HTTP/1.1\r\nHost: r\r\n"
                         + headers + b"Connection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ")
    return header_lines(answer), header_lines(pod.requests[0].head)


def names(lines: list[bytes]) -> set[bytes]:
    return {line.partition(b":")[0].lower() for line in lines}


PROXY_ANSWER = (b"HTTP/1.1 200 OK\r\nProxy: http://evil:1\r\nProxy-Status: pod\r\n"
                b"PROXY-Foo: z\r\nX-Kept: yes\r\ncontent-length: 2\r\n\r\nok")


def test_proxy_headers_are_not_forwarded_to_the_pod(
    start_raw_pods: StartRawPods, start_router: StartRouter
):
    """`Proxy` and every `Proxy-*` are hop-by-hop: `Proxy` would become a CGI sandbox's
    HTTP_PROXY (httpoxy), the outgoing proxy of the code it runs."""
    pod = start_raw_pods(rawpod.answering(rawpod.OK))[0]
    client = start_router(static_config([pod]))
    _, lines = exchange(client, pod, b"Proxy: http://evil:1\r\nProxy-Foo: y\r\n"
                        b"PROXY-Authorization: Basic eA==\r\nX-Custom: kept\r\n")
    assert not any(name.startswith(b"proxy") for name in names(lines))
    assert b"x-custom: kept" in lines


def test_proxy_headers_are_not_forwarded_to_the_client(
    start_raw_pods: StartRawPods, start_router: StartRouter
):
    pod = start_raw_pods(rawpod.answering(PROXY_ANSWER))[0]
    client = start_router(static_config([pod]))
    answer, _ = exchange(client, pod, b"")
    assert not any(name.startswith(b"proxy") for name in names(answer))
    assert b"x-kept" in names(answer)


def test_underscore_spellings_of_the_routers_own_headers_are_dropped(
    start_raw_pods: StartRawPods, start_router: StartRouter
):
    """A WSGI or CGI sandbox reads `X_Forwarded_For` as it reads `X-Forwarded-For`
    (HTTP_X_FORWARDED_FOR): a name with `_` that reads as a header the router strips or
    sets is dropped; any other passes, as the agent-sandbox routers pass it."""
    pod = start_raw_pods(rawpod.answering(rawpod.OK))[0]
    client = start_router(static_config([pod]))
    spoofs = [b"X_Forwarded_For", b"x_forwarded_proto", b"X-Forwarded_Host", b"X_Real_IP",
              b"X_Client_IP", b"True_Client_IP",
              b"X_Request_ID", b"X-Sandbox_ID", b"X_Sandbox_Pod_IP", b"Proxy_Authorization",
              b"Keep_Alive", b"Content_Length", b"Transfer_Encoding"]
    _, lines = exchange(client, pod, b"".join(name + b": 6\r\n" for name in spoofs)
                        + b"X_Api_Key: k\r\nX-Custom_Header: c\r\n")
    assert not names(lines) & {name.lower() for name in spoofs}
    assert b"x_api_key: k" in lines and b"x-custom_header: c" in lines
    assert len([name for name in names(lines) if name.startswith(b"x-forwarded-")]) == 3


CLAIMS = (b"X-Forwarded-For: 203.0.113.9\r\nX-Forwarded-Proto: https\r\n"
          b"X-Forwarded-Host: bank.example\r\nForwarded: for=203.0.113.9;proto=https\r\n"
          b"X-Real-IP: 203.0.113.9\r\nX-Forwarded-Port: 443\r\n"
          b"X-Forwarded-Prefix: /admin\r\nX-Forwarded-Server: edge\r\n"
          b"X-Forwarded-Client-Cert: Hash=ab;Subject=\"CN=admin\"\r\n"
          b"X-Client-IP: 203.0.113.9\r\nTrue-Client-IP: 203.0.113.9\r\n"
          b"CF-Connecting-IP: 203.0.113.9\r\nX-Forwarded: for=203.0.113.9\r\n")
CLIENT_IP = {b"x-client-ip", b"true-client-ip", b"cf-connecting-ip", b"x-forwarded"}


@pytest.mark.parametrize(("trusted", "expected"), [
    # No trusted proxy, or the peer (127.0.0.1) not one: the router's own values.
    ((), [b"x-forwarded-for: 203.0.113.9, 127.0.0.1", b"x-forwarded-proto: http",
          b"x-forwarded-host: r"]),
    (("192.0.2.0/24",), [b"x-forwarded-for: 203.0.113.9, 127.0.0.1",
                         b"x-forwarded-proto: http", b"x-forwarded-host: r"]),
    # The peer is a trusted proxy: what it says of its client passes.
    (("127.0.0.0/8",), [b"x-forwarded-proto: https", b"x-forwarded-host: bank.example",
                        b"forwarded: for=203.0.113.9;proto=https", b"x-real-ip: 203.0.113.9",
                        b"x-forwarded-for: 203.0.113.9, 127.0.0.1", b"x-forwarded-port: 443",
                        b"x-forwarded-prefix: /admin", b"x-forwarded-server: edge",
                        b'x-forwarded-client-cert: Hash=ab;Subject="CN=admin"',
                        b"x-client-ip: 203.0.113.9", b"true-client-ip: 203.0.113.9",
                        b"cf-connecting-ip: 203.0.113.9", b"x-forwarded: for=203.0.113.9"]),
])
def test_only_a_trusted_proxy_says_how_and_where_the_client_came_from(
    start_raw_pods: StartRawPods, start_router: StartRouter, trusted: tuple[str, ...],
    expected: list[bytes]
):
    """Any client can write `X-Forwarded-Proto: https`, `Forwarded` or Envoy's
    `X-Forwarded-Client-Cert`: they reach the pod only from a peer in
    --trusted-proxy-cidrs, as `X-Forwarded-For` is read only from one, and so does every
    other `X-Forwarded-*`. `X-Forwarded-For` is appended to either way: its right-most hop
    is the peer."""
    pod = start_raw_pods(rawpod.answering(rawpod.OK))[0]
    networks = tuple(ipaddress.ip_network(cidr) for cidr in trusted)
    client = start_router(static_config([pod], trusted_proxy_cidrs=networks))
    _, lines = exchange(client, pod, CLAIMS)
    said = [line for line in lines if line.partition(b":")[0].lower() in
            {b"forwarded", b"x-real-ip", *CLIENT_IP} or line.lower().startswith(b"x-forwarded-")]
    assert sorted(said) == sorted(expected)


def test_forwarding_headers_are_set(start_pods: StartPods, start_router: StartRouter):
    pods = start_pods(1)
    client = start_router(static_config(pods))
    client.get("/", headers={"Host": "api.example", "X-Forwarded-For": "203.0.113.9"})
    seen = pods[0].app.seen[0]
    assert seen.header("x-forwarded-for") == "203.0.113.9, 127.0.0.1"
    assert seen.header("x-forwarded-proto") == "http"
    assert seen.header("x-forwarded-host") == "api.example"


def test_request_id_is_kept_and_echoed(start_pods: StartPods, start_router: StartRouter):
    pods = start_pods(1)
    client = start_router(static_config(pods))
    response = client.get("/", headers={"X-Request-ID": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    assert pods[0].app.seen[0].header("x-request-id") == "abc-123"
    # The pod's own X-Request-ID is replaced, never doubled.
    assert response.headers.get_list("x-request-id") == ["abc-123"]


def test_request_id_is_generated_when_missing(start_pods: StartPods, start_router: StartRouter):
    pods = start_pods(1)
    client = start_router(static_config(pods))
    first, second = client.get("/"), client.get("/")
    ids = [first.headers["x-request-id"], second.headers["x-request-id"]]
    assert len(set(ids)) == 2
    assert [s.header("x-request-id") for s in pods[0].app.seen] == ids


def test_error_responses_carry_the_request_id(start_router: StartRouter):
    from router.pods import StaticPodSource

    client = start_router(static_config([]), source=StaticPodSource([]))
    response = client.get("/", headers={"X-Request-ID": "trace-me"})
    assert response.status_code == 503
    assert response.headers["x-request-id"] == "trace-me"


def test_compressed_body_passes_unchanged(start_pods: StartPods, start_router: StartRouter):
    pods = start_pods(1)
    client = start_router(static_config(pods))
    with client.stream("GET", "/gzip", headers={"Accept-Encoding": "gzip"}) as response:
        raw = b"".join(response.iter_raw())
    assert response.headers["content-encoding"] == "gzip"
    assert gzip.decompress(raw) == b"hello " * 100
    assert pods[0].app.seen[0].header("accept-encoding") == "gzip"


def test_client_without_accept_encoding_gets_none_added(
    start_pods: StartPods, start_router: StartRouter
):
    pods = start_pods(1)
    client = start_router(static_config(pods))
    raw_request(
        str(client.base_url).rstrip("/"),
        b"GET / HTTP/1.1\r\nHost: r\r\nConnection: close\r\n\r\n",
    )
    names = {name for name, _ in pods[0].app.seen[0].headers}
    assert not names & {"accept-encoding", "user-agent", "accept", "content-type"}


def test_repeated_set_cookie_headers_all_pass(start_pods: StartPods, start_router: StartRouter):
    pods = start_pods(1)
    client = start_router(static_config(pods))
    response = client.get("/cookies")
    assert response.headers.get_list("set-cookie") == ["a=1; Path=/", "b=2; Path=/"]


def test_cookies_are_not_kept_by_the_router(start_pods: StartPods, start_router: StartRouter):
    pods = start_pods(1)
    client = start_router(static_config(pods))
    client.get("/cookies")
    client.cookies.clear()
    client.get("/")
    assert pods[0].app.seen[1].header("cookie") is None


def test_hop_by_hop_response_headers_are_dropped(
    start_pods: StartPods, start_router: StartRouter
):
    pods = start_pods(1)
    client = start_router(static_config(pods))
    response = client.get("/hop")
    assert response.headers["x-kept"] == "yes"
    assert "x-secret-hop" not in response.headers
    assert "keep-alive" not in response.headers


def test_upstream_timeout_answers_504(start_pods: StartPods, start_router: StartRouter):
    pods = start_pods(1)
    client = start_router(static_config(pods, proxy_timeout=0.5))
    response = client.get("/slow?seconds=2")
    assert response.status_code == 504
    assert response.json() == {"detail": "The backend sandbox did not answer in time."}


def test_probes_never_reach_a_pod(start_pods: StartPods, start_router: StartRouter):
    pods = start_pods(1)
    client = start_router(static_config(pods))
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/ready").json() == {"status": "ready", "pods": 1}
    assert client.get("/readyz").status_code == 200
    assert pods[0].app.hits == 0


def test_ready_fails_without_a_snapshot(start_router: StartRouter):
    class NeverSynced:
        operator_chosen = False

        def snapshot(self) -> None:
            return None

        def not_ready_reason(self) -> str:
            return "pod list not synced yet"

        async def start(self) -> None:
            return None

        async def stop(self) -> None:
            return None

    client = start_router(static_config([]), source=NeverSynced())
    response = client.get("/ready")
    assert response.status_code == 503
    assert response.json() == {"status": "not ready", "reason": "pod list not synced yet"}
    assert client.get("/healthz").status_code == 200


def test_http_1_0_client_is_served(start_pods: StartPods, start_router: StartRouter):
    pods = start_pods(1)
    client = start_router(static_config(pods))
    host, port = str(client.base_url).removeprefix("http://").rstrip("/").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection._http_vsn, connection._http_vsn_str = 10, "HTTP/1.0"  # type: ignore[attr-defined]
    connection.request("GET", "/old")
    assert json.loads(connection.getresponse().read())["pod"] == "pod-0"
    connection.close()


@pytest.mark.parametrize("framing", [
    b"Content-Length: 5 \r\n",  # blanks after the number: the parser takes it, `int` does not
    b"Content-Length: 5\t\r\n",
    b"Connection: content-length\r\nContent-Length: 5\r\n",  # a length not forwarded
])
def test_a_body_the_parser_read_reaches_the_pod(
    start_pods: StartPods, start_router: StartRouter, framing: bytes
):
    """Whether a request has a body is what its head says to the parser, not whether the
    router could read a length from it: a body framed by a `Content-Length` the router
    does not forward as such still goes to the pod (streamed), never dropped as if the
    request had none."""
    pods = start_pods(1)
    client = start_router(static_config(pods))
    answer = raw_request(
        str(client.base_url).rstrip("/"),
        b"POST /upload HTTP/1.1\r\nHost: r\r\n" + framing + b"Connection: close\r\n\r\nhello",
    )
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["body_bytes"] == 5
    assert pods[0].app.seen[0].body_bytes == 5
