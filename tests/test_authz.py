"""`--authz-mode`: each mode against real requests through the real router to real pods.
What the client got (status, `WWW-Authenticate`, detail), what the pod received (never the
consumed `Authorization`, nothing at all when denied), probes without credentials, the
decision metric and the access-log key."""

from __future__ import annotations

import dataclasses
import hmac
import json
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from router import tokenreview
from router.authz import BearerTokens, Claims, ScopedTokens
from router.config import DEFAULT_SELECTOR, Config, StaticPod
from router.logs import access_line
from router.metrics import Metrics
from router.observe import Exchange, NullObserver, Observer, Route
from router.sandbox_ids import fnv1a_32
from tests.conftest import StartPods, StartRouter, eventually, scrape, static_config, value
from tests.fake_kube import FakeKube
from tests.process import RouterProcess, run_router
from tests.sandbox import Pod
from tests.scoped_tokens import b64, mint, sign

SECRET = b"0123456789abcdef0123456789abcdef"  # 32 bytes, the shortest allowed
# Derived by hand from the format (hmac + base64 in a one-line `python -c`, no router
# code): secret SECRET, claims {"ns":"default","name":"sandbox-a","exp":4102444800}.
GOLDEN = ("v1.eyJucyI6ImRlZmF1bHQiLCJuYW1lIjoic2FuZGJveC1hIiwiZXhwIjo0MTAyNDQ0ODAwfQ"
          ".d0yVRG7FHl9hMPB6n76EiHx9PBVCHLcpRdq0KaneSbo")
LATER = 4102444800  # 2100-01-01: an expiry no test outlives


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def pinned(pod: Pod, token: str | None = None, **extra: str) -> dict[str, str]:
    headers = {"X-Sandbox-ID": pod.name, **extra}
    return {**headers, **bearer(token)} if token is not None else headers


def assert_unauthenticated(response: httpx.Response, detail: str = "Invalid token.") -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json() == {"detail": detail}


def assert_forbidden(response: httpx.Response) -> None:
    assert response.status_code == 403, response.text
    assert response.json() == {"detail": "The token does not grant access to this sandbox."}


def authorizations(pods: list[Pod]) -> list[str | None]:
    """The `Authorization` each pod received, request by request."""
    return [seen.header("authorization") for pod in pods for seen in pod.app.seen]


class Recorder(NullObserver):
    """Keeps every finished exchange, for the access line it makes."""

    def __init__(self) -> None:
        self.exchanges: list[Exchange] = []
        self.started = 0

    def request_started(self, route: Route) -> None:
        self.started += 1

    def request_finished(self, exchange: Exchange) -> None:
        self.exchanges.append(exchange)


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text("# the router's clients\n\nalpha-token\n  beta-token  \n")
    return path


BearerRouter = Callable[..., tuple[list[Pod], httpx.Client]]


@pytest.fixture
def bearer_router(start_pods: StartPods, start_router: StartRouter,
                  token_file: Path) -> BearerRouter:
    """`pods, client = bearer_router(count, **options)`: `count` pods behind a router in
    bearer mode admitting the tokens of `token_file` (`options` go to `start_router`)."""

    def start(count: int, **options: Any) -> tuple[list[Pod], httpx.Client]:
        pods = start_pods(count)
        config = static_config(pods, authz_mode="bearer",
                               authz_bearer_token_file=str(token_file))
        return pods, start_router(config, **options)

    return start


# -- allow-all --


def test_allow_all_passes_authorization_through_untouched(
    start_pods: StartPods, start_router: StartRouter
) -> None:
    pods = start_pods(2)
    recorder = Recorder()
    client = start_router(static_config(pods), observer=recorder)

    assert client.get("/", headers=bearer("for-the-sandbox")).status_code == 200
    assert client.get("/", headers=pinned(pods[1], "pinned-one")).status_code == 200
    assert client.get("/").status_code == 200
    assert sorted(authorizations(pods), key=str) == [
        "Bearer for-the-sandbox", "Bearer pinned-one", None]
    lines = [json.loads(access_line(exchange, time.time())) for exchange in recorder.exchanges]
    assert all("authz" not in line for line in lines)


def test_allow_all_warns_when_listening_beyond_loopback(
    start_pods: StartPods, start_router: StartRouter, caplog: pytest.LogCaptureFixture
) -> None:
    pods = start_pods(1)
    caplog.set_level("WARNING", logger="router.app")
    start_router(static_config(pods, host="127.0.0.1")).get("/")
    assert "allow-all" not in caplog.text
    start_router(static_config(pods, host="0.0.0.0")).get("/")  # the thread binds loopback
    assert "--authz-mode allow-all on 0.0.0.0" in caplog.text


# -- bearer --


def test_bearer_admits_only_the_files_tokens_and_the_pod_never_sees_them(
    bearer_router: BearerRouter
) -> None:
    pods, client = bearer_router(2)

    assert_unauthenticated(client.get("/"), "Missing or invalid Authorization header.")
    assert_unauthenticated(client.get("/", headers={"Authorization": "Basic YWxwaGEtdG9rZW4="}),
                           "Missing or invalid Authorization header.")
    assert_unauthenticated(client.get("/", headers={"Authorization": "Bearer"}),
                           "Missing or invalid Authorization header.")
    assert_unauthenticated(client.get("/", headers=bearer("alpha-tokenX")))
    assert_unauthenticated(client.get("/", headers=bearer("# the router's clients")))
    assert_unauthenticated(client.get("/", headers=pinned(pods[1], "gamma")))
    assert sum(pod.app.hits for pod in pods) == 0  # no denied request reached a pod

    assert client.get("/", headers=bearer("alpha-token")).status_code == 200
    assert client.get("/", headers={"Authorization": "bearer beta-token"}).status_code == 200
    assert client.get("/", headers=pinned(pods[1], "beta-token")).status_code == 200
    assert authorizations(pods) == [None, None, None]


def test_two_authorization_headers_are_refused(
    bearer_router: BearerRouter
) -> None:
    pods, client = bearer_router(1)
    twice = [("Authorization", "Bearer alpha-token"), ("Authorization", "Bearer beta-token")]
    assert_unauthenticated(client.get("/", headers=twice),
                           "Missing or invalid Authorization header.")
    assert pods[0].app.hits == 0


def test_the_decision_comes_before_the_body_is_read(
    bearer_router: BearerRouter
) -> None:
    """A client that announces a gigabyte and sends none of it still gets its 401: nothing
    waits for (or forwards) a body the caller may not send."""
    pods, client = bearer_router(1)
    host, port = str(client.base_url.host), int(client.base_url.port or 0)
    with socket.create_connection((host, port), timeout=10) as raw:
        raw.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n"
                    b"Authorization: Bearer wrong\r\n\r\n")
        head = raw.recv(65536)
    assert head.startswith(b"HTTP/1.1 401 ")
    assert b"\r\nwww-authenticate: Bearer\r\n" in head
    assert pods[0].app.hits == 0
    assert client.get("/", headers=bearer("alpha-token")).status_code == 200


def test_probes_and_metrics_need_no_credential(
    bearer_router: BearerRouter, metrics: Metrics
) -> None:
    pods, client = bearer_router(1, metrics=metrics)
    for probe in ("/healthz", "/ready", "/readyz"):
        assert client.get(probe).status_code == 200
    assert scrape(metrics.port)  # /metrics answered without a credential
    assert_unauthenticated(client.get("/ready-ish"), "Missing or invalid Authorization header.")


def test_bearer_file_is_re_read_when_it_changes(
    bearer_router: BearerRouter, token_file: Path
) -> None:
    pods, client = bearer_router(1)
    assert client.get("/", headers=bearer("alpha-token")).status_code == 200
    assert client.get("/", headers=bearer("rotated-token")).status_code == 401

    replacement = token_file.with_name("tokens.new")  # swapped in whole, as a Secret volume is
    replacement.write_text("rotated-token\n")
    replacement.replace(token_file)

    eventually(lambda: client.get("/", headers=bearer("rotated-token")).status_code == 200)
    assert_unauthenticated(client.get("/", headers=bearer("alpha-token")))


def test_an_unreadable_token_file_keeps_the_last_tokens(
    bearer_router: BearerRouter, token_file: Path,
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(BearerTokens, "CHECK_EVERY", 0.0)  # every request prompts a check
    caplog.set_level("WARNING", logger="router.authz")
    pods, client = bearer_router(1)
    # Served once first: the server thread starts the app (which reads the file) on its own.
    assert client.get("/", headers=bearer("alpha-token")).status_code == 200
    token_file.unlink()

    def checked() -> bool:
        client.get("/", headers=bearer("alpha-token"))
        return "cannot re-read, keeping 2 tokens" in caplog.text

    eventually(checked)
    assert client.get("/", headers=bearer("alpha-token")).status_code == 200


def test_decisions_are_counted_and_logged_without_the_token(
    bearer_router: BearerRouter, metrics: Metrics
) -> None:
    recorder = Recorder()
    pods, client = bearer_router(1, observer=recorder, metrics=metrics)
    client.get("/", headers=bearer("alpha-token"))
    client.get("/", headers=bearer("not-a-token"))
    client.get("/")

    samples = scrape(metrics.port)
    assert value(samples, "warmpool_router_authz_decisions_total", decision="allow") == 1
    assert value(samples, "warmpool_router_authz_decisions_total", decision="deny") == 2
    lines = [access_line(exchange, time.time()) for exchange in recorder.exchanges]
    assert [(json.loads(line)["authz"], json.loads(line)["status"]) for line in lines] == [
        ("allow", 200), ("deny", 401), ("deny", 401)]
    assert not any("token" in line for line in lines)


def test_the_access_log_of_the_real_command_has_the_decision(
    start_pods: StartPods, token_file: Path
) -> None:
    pods = start_pods(1)
    router = RouterProcess(["--pods", f"{pods[0].name}={pods[0].ip}:{pods[0].port}",
                            "--authz-mode", "bearer", "--authz-bearer-token-file", str(token_file)])
    try:
        with httpx.Client(base_url=router.url) as client:
            assert client.get("/", headers=bearer("alpha-token")).status_code == 200
            assert client.get("/", headers=bearer("wrong-token")).status_code == 401
    finally:
        assert router.stop() == 0
    access = [json.loads(line) for line in router.lines if '"request_id"' in line]
    assert [(entry["status"], entry["authz"]) for entry in access] == [(200, "allow"),
                                                                       (401, "deny")]
    assert not any("alpha-token" in line or "wrong-token" in line for line in router.lines)


# -- scoped-token --


def test_golden_vector() -> None:
    """The by-hand token: the test helper mints it, the router reads its claims, and its
    expiry is exclusive (valid the second before `exp`, expired at `exp`)."""
    assert mint(SECRET, "default", "sandbox-a", LATER) == GOLDEN
    tokens = ScopedTokens(SECRET)
    assert tokens.verify(GOLDEN, now=LATER - 1) == Claims("default", "sandbox-a", LATER)
    assert tokens.verify(GOLDEN, now=LATER - 0.001) is not None
    assert tokens.verify(GOLDEN, now=LATER) is None
    assert ScopedTokens(SECRET + b"x").verify(GOLDEN, now=0) is None


def forged(payload_claims: str, secret: bytes = SECRET) -> str:
    payload = b64(payload_claims.encode())
    return f"v1.{payload}.{sign(secret, payload)}"


@pytest.mark.parametrize(("token", "claims"), [
    (forged('{"ns":"default","name":"a","exp":99,"extra":[1]}'), Claims("default", "a", 99)),
    (forged('{"name":"a","exp":99}'), Claims("", "a", 99)),  # a missing claim is empty
    (forged('{"ns":null,"name":"a","exp":99}'), Claims("", "a", 99)),
    (forged('{"ns":"default","name":"a"}'), None),  # no exp: 0, long expired
    (forged('{"ns":"default","name":"a","exp":99.5}'), None),  # Go's int64 refuses it
    (forged('{"ns":3,"name":"a","exp":99}'), None),
    (forged('["default","a",99]'), None),
    (forged("not json"), None),
    (forged('{"ns":"default","name":"a","exp":99}') + "=", None),  # padding is not base64url raw
    ("v2" + forged('{"ns":"default","name":"a","exp":99}')[2:], None),
    (forged('{"ns":"default","name":"a","exp":99}')[3:], None),  # no version
])
def test_claims_are_read_as_the_go_router_reads_them(token: str, claims: Claims | None) -> None:
    assert ScopedTokens(SECRET).verify(token, now=50) == claims


@pytest.fixture
def scoped_config(tmp_path: Path) -> Any:
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(b"  " + SECRET + b"\n")  # a mounted Secret's newline is trimmed

    def make(pods: list[Pod], **options: Any) -> Config:
        return static_config(pods, authz_mode="scoped-token",
                             authz_scoped_token_secret_file=str(secret_file), **options)

    return make


def test_a_scoped_token_reaches_its_sandbox_and_no_other(
    start_pods: StartPods, start_router: StartRouter, scoped_config: Any
) -> None:
    pods = start_pods(2)
    client = start_router(scoped_config(pods, allow_loopback_pod_ip=True))
    own = mint(SECRET, "default", pods[1].name, LATER)

    response = client.get("/", headers=pinned(pods[1], own))
    assert response.status_code == 200 and response.json()["pod"] == pods[1].name
    assert_forbidden(client.get("/", headers=pinned(pods[0], own)))
    assert_forbidden(client.get("/", headers=pinned(pods[1], own, **{
        "X-Sandbox-Namespace": "other"})))
    assert_forbidden(client.get("/", headers=pinned(pods[1], own, **{
        "X-Sandbox-Pod-IP": pods[1].ip})))  # even its own address: routed by name only
    assert_forbidden(client.get("/", headers=bearer(own)))  # not a pool token
    assert_forbidden(client.get("/", headers=pinned(pods[1], mint(SECRET, "other",
                                                                   pods[1].name, LATER))))
    assert authorizations(pods) == [None]
    assert pods[0].app.hits == 0


def test_expired_tampered_and_forged_scoped_tokens_are_401(
    start_pods: StartPods, start_router: StartRouter, scoped_config: Any
) -> None:
    pods = start_pods(1)
    client = start_router(scoped_config(pods))
    name = pods[0].name
    good = mint(SECRET, "default", name, LATER)
    version, payload, signature = good.split(".")
    other_payload = b64(json.dumps({"ns": "default", "name": name, "exp": LATER + 1},
                                   separators=(",", ":")).encode())
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    refused = {
        # exp exactly now is expired: the router's clock can only be at or past this second
        "expired": mint(SECRET, "default", name, int(time.time())),
        "tampered payload": f"{version}.{other_payload}.{signature}",
        "tampered signature": f"{version}.{payload}.{flipped}",
        "wrong secret": mint(SECRET[::-1], "default", name, LATER),
        "without the version": f"{payload}.{signature}",
        "without the signature": f"{version}.{payload}",
        "unsigned": f"{version}.{payload}.",
        "not base64url": f"{version}.{payload}.{signature[:-1]}+",
        "the payload signed without its context": (
            f"{version}.{payload}.{b64(hmac.digest(SECRET, payload.encode(), 'sha256'))}"),
    }
    for case, token in refused.items():
        response = client.get("/", headers=pinned(pods[0], token))
        assert response.status_code == 401, case
        assert_unauthenticated(response)
    assert_unauthenticated(client.get("/", headers=pinned(pods[0])),
                           "Missing or invalid Authorization header.")
    assert_unauthenticated(client.get("/", headers=pinned(pods[0], "not-a-scoped-token")))
    assert pods[0].app.hits == 0
    assert client.get("/", headers=pinned(pods[0], good)).status_code == 200


def assert_pool_needs(client: httpx.Client, pods: list[Pod], pool_name: str) -> None:
    """Pool requests pass with the pool's token, in `default`, and with no other."""
    pool = mint(SECRET, "default", pool_name, LATER)
    assert [client.get("/", headers=bearer(pool)).status_code for _ in pods] == [200, 200]
    assert {pod.app.hits for pod in pods} == {1}
    assert_forbidden(client.get("/", headers=bearer(mint(SECRET, "other", pool_name, LATER))))
    assert_forbidden(client.get("/", headers=bearer(mint(SECRET, "default", "pool-x", LATER))))
    assert_forbidden(client.get("/", headers=bearer(mint(SECRET, "default", pods[0].name,
                                                          LATER))))
    assert_forbidden(client.get("/", headers={**bearer(pool), "X-Sandbox-Pod-IP": "10.0.0.9"}))
    assert authorizations(pods) == [None, None]


def test_pool_requests_of_a_static_pool_need_the_pool_token(
    start_pods: StartPods, start_router: StartRouter, scoped_config: Any
) -> None:
    pods = start_pods(2)
    assert_pool_needs(start_router(scoped_config(pods)), pods, "pool:")


def test_a_sandbox_named_like_the_pool_is_not_the_pool(
    start_pods: StartPods, start_router: StartRouter, scoped_config: Any
) -> None:
    """A sandbox named `pool` (or like the warm pool): its token reaches it and not the
    pool, and the pool's token reaches the pool and not it."""
    pods = start_pods(2)
    config = dataclasses.replace(scoped_config(pods), pods=(
        StaticPod("pool", pods[0].ip, pods[0].port), StaticPod("sb-b", pods[1].ip, pods[1].port)))
    client = start_router(config)
    sandbox = mint(SECRET, "default", "pool", LATER)
    pool = mint(SECRET, "default", "pool:", LATER)
    as_sandbox = {"X-Sandbox-ID": "pool"}
    assert client.get("/", headers={**bearer(sandbox), **as_sandbox}).status_code == 200
    assert_forbidden(client.get("/", headers=bearer(sandbox)))
    assert_forbidden(client.get("/", headers={**bearer(pool), **as_sandbox}))
    assert client.get("/", headers=bearer(pool)).status_code == 200
    assert pods[0].app.hits + pods[1].app.hits == 2


def test_pool_requests_of_a_warm_pool_need_its_token(
    kube: FakeKube, tmp_path: Path, start_pods: StartPods, start_router: StartRouter,
    scoped_config: Any,
) -> None:
    pods = start_pods(2)
    kube.add_pods(pods, labels={DEFAULT_SELECTOR: fnv1a_32("python-pool")})
    config = dataclasses.replace(
        scoped_config([]), warm_pool="python-pool", pod_port=pods[0].port,
        kubeconfig=str(kube.write_kubeconfig(tmp_path / "kubeconfig")),
        allow_loopback_pod_ip=True)  # the fake API lists pods on 127.0.0.x
    client = start_router(config)
    eventually(lambda: client.get("/ready").status_code == 200)
    assert_pool_needs(client, pods, "pool:python-pool")


# -- tokenreview --


@pytest.fixture
def reviewed(kube: FakeKube, tmp_path: Path, start_pods: StartPods,
             start_router: StartRouter) -> Any:
    """A router in tokenreview mode over two static pods, reviewing through the fake API."""
    kube.tokens["sa-token"] = ()
    kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")

    def start(observer: Observer | None = None, **options: Any
              ) -> tuple[httpx.Client, list[Pod]]:
        pods = start_pods(2)
        config = static_config(pods, authz_mode="tokenreview", kubeconfig=str(kubeconfig))
        return start_router(dataclasses.replace(config, **options), observer=observer), pods

    return start


def test_tokenreview_caches_each_answer(kube: FakeKube, reviewed: Any) -> None:
    client, pods = reviewed()
    answers = [client.get("/", headers=bearer("sa-token")).status_code for _ in range(20)]
    assert answers == [200] * 20
    assert 1 <= kube.count("tokenreview") <= 2

    for _ in range(5):
        assert_unauthenticated(client.get("/", headers=bearer("stolen-token")))
    assert 2 <= kube.count("tokenreview") <= 4  # the denial is cached too
    assert_unauthenticated(client.get("/"), "Missing or invalid Authorization header.")
    assert authorizations(pods) == [None] * 20
    assert [review["token"] for review in kube.reviews][:1] == ["sa-token"]


def test_concurrent_requests_with_one_token_share_one_review(
    kube: FakeKube, reviewed: Any
) -> None:
    recorder = Recorder()
    client, _ = reviewed(observer=recorder)
    # The review is held until all 20 requests wait for it (the hang ends before the pool
    # waits for its requests: contexts exit last first).
    with ThreadPoolExecutor(20) as pool, kube.hang():
        futures = [pool.submit(client.get, "/", headers=bearer("sa-token")) for _ in range(20)]
        # A request reaches the authorizer in the same step of the loop it starts in.
        eventually(lambda: recorder.started == 20)
    assert [future.result().status_code for future in futures] == [200] * 20
    assert kube.count("tokenreview") == 1


def test_tokenreview_sends_the_audiences(kube: FakeKube, reviewed: Any) -> None:
    kube.tokens["other-audience"] = ("vault",)
    kube.tokens["router-audience"] = ("sandbox-router",)
    client, _ = reviewed(authz_tokenreview_audiences=("sandbox-router", "gateway"))
    assert_unauthenticated(client.get("/", headers=bearer("other-audience")))
    assert client.get("/", headers=bearer("router-audience")).status_code == 200
    assert {tuple(review["audiences"]) for review in kube.reviews} == {
        ("sandbox-router", "gateway")}


def test_an_api_outage_is_a_brief_503_not_a_lasting_denial(
    kube: FakeKube, reviewed: Any
) -> None:
    client, pods = reviewed()
    kube.fail(500)
    response = client.get("/", headers=bearer("sa-token"))
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert sum(pod.app.hits for pod in pods) == 0
    kube.fail(None)
    eventually(lambda: client.get("/", headers=bearer("sa-token")).status_code == 200)
    assert kube.count("tokenreview") >= 2


def test_a_cached_answer_expires_after_the_ttl(kube: FakeKube, reviewed: Any) -> None:
    client, _ = reviewed(authz_tokenreview_ttl=0.2)
    assert client.get("/", headers=bearer("sa-token")).status_code == 200
    assert kube.count("tokenreview") == 1
    kube.tokens.clear()  # revoked: once the answer expires, the next review says no

    eventually(lambda: client.get("/", headers=bearer("sa-token")).status_code == 401)
    assert kube.count("tokenreview") >= 2


def test_a_flood_of_tokens_queues_no_reviews_and_holds_no_request(
    kube: FakeKube, reviewed: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Random tokens while the API hangs: at most THREADS reviews reach it, at most
    MAX_WAITING requests wait for a thread (the rest are 503 at once), none waits past
    REVIEW_WAIT (503), and once the API answers again a valid token is reviewed at once:
    nothing was queued behind the flood. Before, every token queued a review, and every
    request waited for its own however long the queue."""
    monkeypatch.setattr(tokenreview, "MAX_WAITING", 4)
    monkeypatch.setattr(tokenreview, "REVIEW_WAIT", 1.0)
    client, pods = reviewed()
    flood = [f"random-{i}" for i in range(tokenreview.THREADS + 8)]
    with ThreadPoolExecutor(len(flood)) as pool, kube.hang():
        futures = [pool.submit(client.get, "/", headers=bearer(token)) for token in flood]
        eventually(lambda: all(future.done() for future in futures))
        assert kube.count("tokenreview") == tokenreview.THREADS
    answers = [future.result() for future in futures]
    assert [answer.status_code for answer in answers] == [503] * len(flood)
    assert {answer.headers["retry-after"] for answer in answers} == {"1"}
    eventually(lambda: client.get("/", headers=bearer("sa-token")).status_code == 200)
    assert kube.count("tokenreview") == tokenreview.THREADS + 1
    assert sum(pod.app.hits for pod in pods) == 1


def test_a_flood_of_tokens_cannot_lock_out_a_caller_approved_before(
    kube: FakeKube, reviewed: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While random tokens hold every slot and waiting place of new tokens, a token
    approved before is reviewed again, as its approval expires, in slots of its own.
    Before, its review queued behind the flood's: 503 at every expiry, for every caller."""
    monkeypatch.setattr(tokenreview, "MAX_WAITING", 4)
    client, pods = reviewed(authz_tokenreview_ttl=0.3)
    assert client.get("/", headers=bearer("sa-token")).status_code == 200
    flood = [f"random-{i}" for i in range(tokenreview.THREADS + 8)]
    statuses = []

    def renewed() -> bool:
        statuses.append(client.get("/", headers=bearer("sa-token")).status_code)
        return [review["token"] for review in kube.reviews].count("sa-token") >= 3

    hung = kube.hang(only=lambda call: call.query.get("token", "").startswith("random-"))
    with ThreadPoolExecutor(len(flood)) as pool, hung:
        futures = [pool.submit(client.get, "/", headers=bearer(token)) for token in flood]
        kube.wait_for(lambda: kube.hanging == tokenreview.THREADS)  # new tokens' slots taken
        eventually(renewed)  # two expiries of its approval, each renewed
    assert set(statuses) == {200}
    # Past the waiting places 503 at once; the others denied once the API answers.
    assert {future.result().status_code for future in futures} == {401, 503}


def test_denied_tokens_never_push_an_approved_one_out(
    kube: FakeKube, reviewed: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tokenreview, "CACHE_SIZE", 8)
    client, _ = reviewed()
    assert client.get("/", headers=bearer("sa-token")).status_code == 200
    for i in range(20):
        assert_unauthenticated(client.get("/", headers=bearer(f"random-{i}")))
    assert client.get("/", headers=bearer("sa-token")).status_code == 200
    assert [review["token"] for review in kube.reviews].count("sa-token") == 1


def test_an_answer_that_names_no_audience_asked_for_is_a_denial(
    kube: FakeKube, reviewed: Any
) -> None:
    """An authenticator unaware of audiences (a webhook) authenticates a token minted for
    anyone: with audiences asked for, the answer must name one (the API's advice)."""
    kube.audience_blind.add("webhook-token")
    client, _ = reviewed(authz_tokenreview_audiences=("sandbox-router",))
    assert_unauthenticated(client.get("/", headers=bearer("webhook-token")))
    client, _ = reviewed()  # no audiences asked for: any authenticated token
    assert client.get("/", headers=bearer("webhook-token")).status_code == 200


def test_tokenreview_without_audiences_warns_at_start_up(
    reviewed: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="router.app")
    client, _ = reviewed(authz_tokenreview_audiences=("sandbox-router",))
    assert client.get("/", headers=bearer("sa-token")).status_code == 401
    assert "without --authz-tokenreview-audiences" not in caplog.text
    client, _ = reviewed()
    assert client.get("/", headers=bearer("sa-token")).status_code == 200
    assert "--authz-mode tokenreview without --authz-tokenreview-audiences" in caplog.text


# -- start-up --


@pytest.mark.parametrize(("args", "error"), [
    (["--authz-mode", "bearer"], "--authz-mode bearer needs --authz-bearer-token-file"),
    (["--authz-mode", "scoped-token"],
     "--authz-mode scoped-token needs --authz-scoped-token-secret-file"),
    (["--authz-bearer-token-file", "/dev/null"],
     "--authz-bearer-token-file is only used with --authz-mode bearer"),
    (["--authz-mode", "open"], "expected one of allow-all, bearer, tokenreview, scoped-token"),
    (["--authz-mode", "tokenreview"], "cannot load the Kubernetes configuration (in-cluster)"),
    (["--authz-mode", "bearer", "--authz-bearer-token-file", "/nonexistent/tokens"],
     "--authz-bearer-token-file /nonexistent/tokens: No such file or directory"),
])
def test_a_mode_without_what_it_needs_stops_start_up(args: list[str], error: str) -> None:
    result = run_router(["--pods", "a=127.0.0.2:1", *args], env={"KUBECONFIG": ""})
    assert result.returncode == 2
    assert error in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_short_scoped_secret_stops_start_up(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"\n" + SECRET[:31] + b" \n")  # 31 bytes once trimmed
    result = run_router(["--pods", "a=127.0.0.2:1", "--authz-mode", "scoped-token",
                         "--authz-scoped-token-secret-file", str(secret)])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"warmpool-router: error: --authz-scoped-token-secret-file {secret}: the secret must "
        "be at least 32 bytes after trimming, got 31"]


def test_environment_variables_choose_the_mode(token_file: Path) -> None:
    from router import config

    options = config.load([], env={"ROUTER_AUTHZ_MODE": "bearer",
                                   "ROUTER_AUTHZ_BEARER_TOKEN_FILE": str(token_file),
                                   "ROUTER_AUTHZ_TOKENREVIEW_AUDIENCES": "a, b,,"})
    assert (options.authz_mode, options.authz_bearer_token_file) == ("bearer", str(token_file))
    assert options.authz_tokenreview_audiences == ("a", "b")
    assert options.authz_tokenreview_ttl == 30.0
