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
EACH = 5
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


def judge_requests(sent: list[Sent], outcome: Outcome, received: list[Received],
                   complete: bool = True) -> None:
    """What the pods received whole of one connection's requests, and what the client was
    answered, against what the client sent (all of it, if `complete`)."""
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
    closed_at = None  # the answer after which the router closes the connection
    for index, answer in enumerate(outcome.answers):
        request = sent[index]
        got = answer.headers.get(b"x-got")
        if got is not None:  # a pod's answer: to this request, in order
            assert closed_at is None, "a pod answer after the router said it would close"
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
        if answer.headers.get(b"connection") == b"close":  # the last on the connection
            closed_at = index
    if closed_at is not None:
        assert not set(ids) & set(order[closed_at + 1:]), (
            f"closed after {sent[closed_at].mutation or 'valid'}, yet the pods got {ids}")
    if all(request.mutation is None for request in sent) and complete:
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

    def check(self, data: st.DataObject, mutation: str | None, cut_short: bool = False
              ) -> None:
        """One client's pipeline, with `mutation` in it, or, `cut_short`, ending anywhere
        (a head, a body, a chunk line) with the client gone."""
        self.clock.advance(60)
        sent, cuts = data.draw(pipeline(next(self.examples), mutation), label="pipeline")
        self.meant.update((request.id, request) for request in sent)
        wire = b"".join(s.data for s in sent)
        if cut_short:
            wire = wire[:data.draw(st.integers(1, len(wire) - 1), label="cut short at")]
            cuts = [cut for cut in cuts if cut < len(wire)]
        outcome = send_and_read(self.port, wire, cuts, [s.method for s in sent],
                                QUIET if mutation else None, leave=cut_short)
        assert idle(self.server) and self.pod.settled(), (
            "a pod connection was left inside a request")
        with self.pod.changed:
            received = list(self.pod.received)
            violations, self.violations = self.pod.violations[self.violations:], len(
                self.pod.violations)
        assert violations == [], "the pod could not parse what the router sent"
        late, self.judged = received[self.judged:], len(received)
        judge_requests(sent, outcome, received, not cut_short)
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


def test_a_request_cut_short_reaches_no_pod_whole(
    start_raw_pods: StartRawPods, start_router: StartRouter, servers: list[ServerThread]
) -> None:
    """The client leaves anywhere in its pipeline: a request it did not send all of never
    reaches a pod whole (the router closes that pod connection); those before do."""
    router = RequestRouter(start_raw_pods, start_router, servers)

    @settings(PROPERTY, max_examples=60)
    @given(st.data())
    def check(data: st.DataObject) -> None:
        router.check(data, None, cut_short=True)

    check()


def test_a_malformed_request_reaches_no_pod_unframed(
    start_raw_pods: StartRawPods, start_router: StartRouter, servers: list[ServerThread]
) -> None:
    """Every mutation (`MUTATIONS`) a few times, among valid requests on its connection."""
    router = RequestRouter(start_raw_pods, start_router, servers)
    for name in sorted(MUTATIONS):
        each(name, router.check)()


def judge_answers(exchanged: list[tuple[str, Scripted]], outcome: Outcome) -> None:
    """The client's view of the pod's answers, pipelined on one connection, against what
    the pod sent, and then of a last request's, which the pod answers plainly: one answer
    each, in order, nothing more."""
    for index, (_, scripted) in enumerate(exchanged):
        what = scripted.mutation or "valid"
        if index == len(outcome.answers):  # cut before this answer was whole
            assert scripted.mutation is not None, f"a valid answer was cut: {outcome}"
            return
        answer = outcome.answers[index]
        if b"x-pod" in answer.headers:  # passed on
            assert not scripted.refuse, f"{what} passed on whole: {answer}"
            assert (answer.status, answer.body) == (scripted.status, scripted.body), (
                f"{what}: the client got {answer.status} {answer.body!r}, "
                f"the pod meant {scripted.status} {scripted.body!r}")
        else:  # the router's own: only a 502, only for a malformed answer
            assert scripted.mutation is not None, f"a valid answer became {answer}"
            assert answer.status == 502, answer
        if answer.headers.get(b"connection") == b"close":
            return
    assert outcome.cut is None and len(outcome.answers) == len(exchanged) + 1, (
        f"the last request on the connection was not answered: {outcome}")
    last = outcome.answers[-1]
    assert (last.status, last.body) == (200, f"ok /next/{exchanged[-1][0]}".encode()), (
        f"another answer came for the last request: {last}")


def answer_router(start_raw_pods: StartRawPods, start_router: StartRouter
                  ) -> tuple[ScriptedPod, int]:
    pod = ScriptedPod()
    pods = start_raw_pods(pod)
    client = start_router(static_config(pods, max_response_head=ANSWER_HEAD,
                                        proxy_timeout=WAIT, access_log=False))
    assert client.base_url.port is not None
    return pod, client.base_url.port


def exchange(pod: ScriptedPod, port: int, exchanged: list[tuple[str, Scripted]],
             methods: list[str]) -> Outcome:
    """The scripted answers' requests pipelined, with `methods`, then a GET."""
    requests = []
    for (key, scripted), method in zip(exchanged, methods, strict=True):
        pod.answers[key] = scripted
        requests.append(f"{method} /a/{key} HTTP/1.1\r\nHost: router\r\n\r\n")
    requests.append(f"GET /next/{exchanged[-1][0]} HTTP/1.1\r\nHost: router\r\n\r\n")
    return send_and_read(port, "".join(requests).encode(), [], [*methods, "GET"])


def test_what_a_pod_answers_reaches_the_client_whole(
    start_raw_pods: StartRawPods, start_router: StartRouter
) -> None:
    """1-3 requests pipelined on a connection, each a GET (or a HEAD) of a generated
    answer: each reaches the client whole, in order."""
    pod, port = answer_router(start_raw_pods, start_router)
    keys = itertools.count()

    @settings(PROPERTY, max_examples=80)
    @given(st.data())
    def check(data: st.DataObject) -> None:
        heads = data.draw(st.lists(st.integers(0, 3).map(lambda n: n == 0), min_size=1,
                                   max_size=3), label="head")
        exchanged = [(str(next(keys)), data.draw(valid_answer(head_only), label="answer"))
                     for head_only in heads]
        judge_answers(exchanged, exchange(pod, port, exchanged,
                                          ["HEAD" if head_only else "GET" for head_only in heads]))

    check()


def test_a_malformed_answer_reaches_the_client_as_502_or_cut(
    start_raw_pods: StartRawPods, start_router: StartRouter
) -> None:
    """Every answer mutation (`ANSWER_MUTATIONS`), after a valid answer or not."""
    pod, port = answer_router(start_raw_pods, start_router)
    keys = itertools.count()

    def check(data: st.DataObject, name: str) -> None:
        exchanged, methods = [], []
        if data.draw(st.booleans(), label="after a valid answer"):
            exchanged.append((str(next(keys)), data.draw(valid_answer(False), label="valid")))
            methods.append("GET")
        # To a HEAD only a mutation of the head: a HEAD answer's body framing is none.
        framing = ANSWER_MUTATIONS[name][0]
        head_only = framing == "head" or (data.draw(st.integers(0, 3), label="head") == 0
                                          and framing == "any")
        exchanged.append((str(next(keys)), data.draw(mutated_answer(head_only, name),
                                                     label="answer")))
        methods.append("HEAD" if head_only else "GET")
        judge_answers(exchanged, exchange(pod, port, exchanged, methods))

    for name in sorted(ANSWER_MUTATIONS):
        each(name, check)()
