"""The framing promises, as properties through a real router on loopback, judged by h11
(a strict parser the router does not use):

- What a client sends reaches a pod only as whole, well-framed requests whose bodies are
  exactly the client's (de-chunked), separate and in order when pipelined; a request the
  router refuses (4xx) reaches no pod whole (tests/framing.py parses the pod's bytes).
- What a pod answers reaches the client as one well-framed answer with the pod's body, or
  as the router's 502 (nothing sent yet), or as a connection cut short: never a whole but
  wrong body, never a second answer.

tests/test_hostile_client.py, test_hostile_pod.py and test_streaming.py hold the
hand-written cases; these generate the shapes around them."""

from __future__ import annotations

import itertools
from collections.abc import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.server import ServerThread
from tests.clock import ManualClock
from tests.conftest import StartRawPods, StartRouter, eventually, static_config
from tests.framing import (
    ANSWER_MUTATIONS,
    MUTATIONS,
    H11Pod,
    Outcome,
    Received,
    Scripted,
    ScriptedPod,
    Sent,
    digest,
    mutated_answer,
    pipeline,
    send_and_read,
    valid_answer,
)
from tests.rawpod import WAIT

PROPERTY = settings(derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                          HealthCheck.large_base_example])
QUIET = 0.5
"""Seconds without a byte from the router after which a client whose request is malformed
half-closes: the router may be waiting for the rest of a body that will not come."""
ANSWER_HEAD = 2048
"""--max-response-head for the answer properties: a generated huge head passes it."""
EACH = 3
"""Examples per mutation."""
RETRY_BODY_LIMIT = 100
"""Bodies up to this are read whole before the pod is asked, larger ones streamed: the
generated bodies (up to 300 bytes) take both paths."""


def each(mutation: str, check: Callable[[st.DataObject, str], None]) -> Callable[[], None]:
    """A property of its own for one mutation (`EACH` examples): each is tried, however
    rarely one property over them all would draw it."""

    @settings(PROPERTY, max_examples=EACH)
    @given(st.data())
    def run(data: st.DataObject) -> None:
        check(data, mutation)

    return run


def judge_received(meant: dict[str, Sent], received: list[Received]) -> None:
    """Every request a pod received whole is one a client sent, as it meant it."""
    for record in received:
        assert record.id in meant, f"a pod got a request nobody sent: {record}"
        request = meant[record.id]
        assert not request.refuse, f"{request.mutation} reached a pod whole: {record}"
        assert (record.method, record.body) == (request.method, request.body), (
            f"{request.mutation or 'valid'}: the pod got {record.method} {record.body!r}, "
            f"the client sent {request.method} {request.body!r}")
        # An empty query is dropped (`router.proxy._raw_path_qs`): `/a?` reaches the pod as `/a`.
        path, _, query = request.target.partition("?")
        assert record.target.decode() == (f"{path}?{query}" if query else path), (
            record.target, request.target)


def judge_requests(sent: list[Sent], outcome: Outcome, received: list[Received]) -> None:
    """What the pods received whole of one connection's requests, and what the client was
    answered, against what the client sent."""
    order = [request.id for request in sent]
    received = [record for record in received if record.id in order]
    judge_received({request.id: request for request in sent}, received)
    at_pods = [(record.pod, record.id) for record in received]
    assert len(set(at_pods)) == len(at_pods), f"a request reached a pod twice: {at_pods}"
    # In order, but for a request answered early: its body may reach the pod after the
    # next request reached another (the router closes the first pod's connection).
    ids = list(dict.fromkeys(r.id for r in received if not meant_early(sent, r.id)))
    assert ids == sorted(ids, key=order.index), f"out of order at the pods: {ids}"
    ids = [record.id for record in received]
    closed_at = None  # where the router refused and closed the connection
    for index, answer in enumerate(outcome.answers):
        request = sent[index]
        got = answer.headers.get(b"x-got")
        if got is not None:  # a pod's answer: to this request, in order
            assert closed_at is None, "a pod answer after the router refused and closed"
            if got.endswith(b" busy"):  # the busy pod's, and the router could not retry
                assert answer.status == 503 and got == f"{request.id} busy".encode(), got
                continue
            meant_got = "early" if request.early else digest(request.body)
            assert got == f"{request.id} {meant_got}".encode(), (got, request.id)
            assert answer.status == 200
        else:  # the router's own: a refusal, and nothing of this request reached a pod
            assert 400 <= answer.status < 600, answer
            assert request.mutation is not None, f"a valid request was refused: {answer}"
            assert request.id not in ids, f"refused {request.mutation}, yet a pod got it"
            if answer.headers.get(b"connection") == b"close":
                closed_at = index
    if closed_at is not None:
        assert not set(ids) & set(order[closed_at:]), (
            f"refused {sent[closed_at].mutation} and closed, yet the pods got {ids}")
    if all(request.mutation is None for request in sent):
        assert outcome.cut is None and len(outcome.answers) == len(sent), outcome


def meant_early(sent: list[Sent], rid: str) -> bool:
    return any(request.early for request in sent if request.id == rid)


def idle(server: ServerThread) -> bool:
    """Waits (bounded) until the router holds no client connection and runs no request:
    whatever it was going to send a pod for the last client, it has."""
    state = server.server.server_state
    eventually(lambda: not state.connections and not state.tasks)
    return True


class RequestRouter:
    """A router over two `H11Pod`s, the first busy (so a request the router can send again
    reaches both), and every request sent through it (by id), so a request that reaches a
    pod whole only after its client's example is judged too."""

    def __init__(self, start_raw_pods: StartRawPods, start_router: StartRouter,
                 servers: list[ServerThread]) -> None:
        self.pod = H11Pod(busy=frozenset({"raw-0"}))
        pods = start_raw_pods(self.pod, self.pod)
        self.clock = ManualClock()  # moved on for each example: no pod rests for long
        client = start_router(static_config(pods, access_log=False,
                                            retry_body_limit=RETRY_BODY_LIMIT),
                              clock=self.clock)
        self.server = servers[-1]
        assert client.base_url.port is not None
        self.port = client.base_url.port
        self.examples = itertools.count()
        self.meant: dict[str, Sent] = {}
        self.judged = 0  # the pod's records judged already
        self.violations = 0  # and its violations

    def check(self, data: st.DataObject, mutation: str | None) -> None:
        self.clock.advance(60)
        sent, cuts = data.draw(pipeline(next(self.examples), mutation), label="pipeline")
        self.meant.update((request.id, request) for request in sent)
        outcome = send_and_read(self.port, b"".join(s.data for s in sent), cuts,
                                [s.method for s in sent], QUIET if mutation else None)
        assert idle(self.server) and self.pod.settled(), (
            "a pod connection was left inside a request")
        with self.pod.changed:
            received = list(self.pod.received)
            violations, self.violations = self.pod.violations[self.violations:], len(
                self.pod.violations)
        assert violations == [], "the pod could not parse what the router sent"
        late, self.judged = received[self.judged:], len(received)
        judge_requests(sent, outcome, received)
        judge_received(self.meant, late)  # an earlier client's request, if one came only now


def test_valid_requests_reach_the_pod_whole_and_in_order(
    start_raw_pods: StartRawPods, start_router: StartRouter, servers: list[ServerThread]
) -> None:
    """Pipelined 1-3 to a connection, in random writes: each reaches the pod as sent,
    bodies de-chunked, and the answers come back in order."""
    router = RequestRouter(start_raw_pods, start_router, servers)

    @settings(PROPERTY, max_examples=80)
    @given(st.data())
    def check(data: st.DataObject) -> None:
        router.check(data, None)

    check()


def test_a_malformed_request_reaches_no_pod_unframed(
    start_raw_pods: StartRawPods, start_router: StartRouter, servers: list[ServerThread]
) -> None:
    """Every mutation (`MUTATIONS`) a few times, among valid requests on its connection."""
    router = RequestRouter(start_raw_pods, start_router, servers)
    for name in sorted(MUTATIONS):
        each(name, router.check)()


def judge_answer(scripted: Scripted, key: str, outcome: Outcome) -> None:
    """The client's view of a pod's answer (and of the next request's, on the same
    connection) against what the pod sent."""
    what = scripted.mutation or "valid"
    if not outcome.answers:  # cut before an answer was whole
        assert scripted.mutation is not None, f"a valid answer was cut: {outcome}"
        return
    first = outcome.answers[0]
    if b"x-pod" in first.headers:  # passed on
        assert not scripted.refuse, f"{what} passed on whole: {first}"
        assert (first.status, first.body) == (scripted.status, scripted.body), (
            f"{what}: the client got {first.status} {first.body!r}, "
            f"the pod meant {scripted.status} {scripted.body!r}")
    else:  # the router's own: only a 502, only for a malformed answer
        assert scripted.mutation is not None, f"a valid answer became {first}"
        assert first.status == 502, first
    if first.headers.get(b"connection") == b"close":
        return
    assert outcome.cut is None and len(outcome.answers) == 2, (
        f"{what}: the next request on the connection was not answered: {outcome}")
    second = outcome.answers[1]
    assert (second.status, second.body) == (200, f"ok /next/{key}".encode()), (
        f"{what}: a second answer came for the next request: {second}")


def answer_router(start_raw_pods: StartRawPods, start_router: StartRouter
                  ) -> tuple[ScriptedPod, int]:
    pod = ScriptedPod()
    pods = start_raw_pods(pod)
    client = start_router(static_config(pods, max_response_head=ANSWER_HEAD,
                                        proxy_timeout=WAIT, access_log=False))
    assert client.base_url.port is not None
    return pod, client.base_url.port


def exchange(pod: ScriptedPod, port: int, key: str, scripted: Scripted, method: str
             ) -> Outcome:
    """`method` for the scripted answer, then a GET on the same connection."""
    pod.answers[key] = scripted
    request = (f"{method} /a/{key} HTTP/1.1\r\nHost: router\r\n\r\n"
               f"GET /next/{key} HTTP/1.1\r\nHost: router\r\n\r\n").encode()
    return send_and_read(port, request, [], [method, "GET"])


def test_what_a_pod_answers_reaches_the_client_whole(
    start_raw_pods: StartRawPods, start_router: StartRouter
) -> None:
    pod, port = answer_router(start_raw_pods, start_router)
    keys = itertools.count()

    @settings(PROPERTY, max_examples=80)
    @given(st.data())
    def check(data: st.DataObject) -> None:
        key = str(next(keys))
        head_only = data.draw(st.integers(0, 3), label="head") == 0
        scripted = data.draw(valid_answer(head_only), label="answer")
        judge_answer(scripted, key, exchange(pod, port, key, scripted,
                                             "HEAD" if head_only else "GET"))

    check()


def test_a_malformed_answer_reaches_the_client_as_502_or_cut(
    start_raw_pods: StartRawPods, start_router: StartRouter
) -> None:
    pod, port = answer_router(start_raw_pods, start_router)
    keys = itertools.count()

    def check(data: st.DataObject, name: str) -> None:
        key = str(next(keys))
        # To a HEAD only a mutation of the head: a HEAD answer's body framing is none.
        head_only = (data.draw(st.integers(0, 3), label="head") == 0
                     and ANSWER_MUTATIONS[name][0] == "any")
        scripted = data.draw(mutated_answer(head_only, name), label="answer")
        judge_answer(scripted, key, exchange(pod, port, key, scripted,
                                             "HEAD" if head_only else "GET"))

    for name in sorted(ANSWER_MUTATIONS):
        each(name, check)()

