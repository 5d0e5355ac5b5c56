"""Generators and an independent oracle for the framing properties
(tests/test_framing_properties.py): requests and pod answers built from parts, valid or
with one framing mutation; a raw pod behaviour that parses what it receives with h11 (a
strict parser the router does not use) and answers each whole request with a digest of
its body; and a raw client that reads the router's answers with h11 too."""

from __future__ import annotations

import dataclasses
import hashlib
import re
import socket
import threading
from collections.abc import Callable

import h11
from hypothesis import strategies as st

from tests.rawpod import WAIT, PodConnection

EOL = b"\r\n"
PATTERN = bytes(range(256))
LARGE = 300 * 1024
ANSWER_LARGE = 1024 * 1024
"""Some bodies are up to this much larger (a repeated pattern): beyond what the router
reads and writes at once, so that its flow control takes part."""
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]
"""Methods with ordinary request semantics (CONNECT has its own: its test is separate)."""
PATH_CHARS = "abcxyzABCXYZ0189-._~!$&'()*+,;=:@"
VALUE_CHARS = st.characters(min_codepoint=0x21, max_codepoint=0x7E)


def digest(body: bytes) -> str:
    return f"{len(body)}-{hashlib.sha256(body).hexdigest()[:16]}"


# -- requests --


@dataclasses.dataclass
class Parts:
    """A message as its pieces: the start line, raw header lines, and the body as framed."""

    line: bytes
    headers: list[bytes]
    framed: bytes
    eols: list[bytes] = dataclasses.field(default_factory=list)  # one per header line

    def wire(self) -> bytes:
        eols = self.eols + [EOL] * (len(self.headers) - len(self.eols))
        return (self.line + EOL + b"".join(h + e for h, e in zip(self.headers, eols, strict=True))
                + EOL + self.framed)


@dataclasses.dataclass
class Sent:
    """One request a client sends: its id (`X-Request-ID`), method and body as meant (the
    body de-chunked), its bytes, and `refuse`: a mutation the router must refuse (4xx) or
    None/False (a valid request, or one the router may take: then exactly as meant).
    `early`: the pod answers it as soon as its head is in (`H11Pod`)."""

    id: str
    method: str
    target: str
    body: bytes
    data: bytes
    mutation: str | None = None
    refuse: bool = False
    early: bool = False


def casing(draw: st.DrawFn, name: str) -> bytes:
    return draw(st.sampled_from([name, name.lower(), name.upper()])).encode()


def chunk_size(draw: st.DrawFn, size: int) -> bytes:
    hexa = b"%x" % size
    hexa = draw(st.sampled_from([hexa, hexa.upper()]))
    return b"0" * draw(st.integers(0, 2)) + hexa


def extensions(draw: st.DrawFn) -> bytes:
    names = st.text("abcxyz", min_size=1, max_size=4)
    one = st.one_of(
        names.map(lambda n: f";{n}"),
        st.tuples(names, names).map(lambda p: f";{p[0]}={p[1]}"),
        st.tuples(names, st.text("abc xyz,;=", max_size=6)).map(lambda p: f';{p[0]}="{p[1]}"'),
    )
    return "".join(draw(st.lists(one, max_size=2))).encode()


def chunked(draw: st.DrawFn, body: bytes) -> tuple[list[bytes], bytes]:
    """`body` in chunks of random sizes (extensions and trailers too): the chunk lines and
    data as a list (so a mutation can reach one chunk line), and the trailer section."""
    pieces: list[bytes] = []
    at = 0
    if len(body) > 1000:  # large: many chunks of one size, down to one byte each
        size = draw(st.sampled_from([1, 7, 4096, 65536, len(body)]))
        line = b"%x" % size + EOL
        pieces = [line + body[at:at + size] + EOL for at in range(0, len(body) - size + 1, size)]
        at = len(pieces) * size
    while at < len(body):
        size = draw(st.integers(1, max(1, len(body) - at)))
        pieces.append(chunk_size(draw, size) + extensions(draw) + EOL + body[at:at + size] + EOL)
        at += size
    last = b"0" * draw(st.integers(1, 3)) + extensions(draw) + EOL
    trailers = draw(st.lists(st.tuples(st.text("abcxyz", min_size=1, max_size=5),
                                       st.text(VALUE_CHARS, min_size=1, max_size=8)),
                             max_size=2))
    section = b"".join(f"x-t-{n}: {v}".encode() + EOL for n, v in trailers) + EOL
    return [*pieces, last], section


@st.composite
def valid_request(draw: st.DrawFn, rid: str, framing: str | None = None) -> tuple[Parts, Sent]:
    """`framing`: "length" or "chunked" (with a body), else any (a body or none)."""
    method = draw(st.sampled_from(METHODS))
    segments = draw(st.lists(st.text(PATH_CHARS, max_size=6)
                             | st.sampled_from(["%2F", "%20", "a%2Fb"]), max_size=3))
    target = "/" + "/".join(segments)
    if draw(st.booleans()):
        target += "?" + draw(st.text(PATH_CHARS + "/?", max_size=8))
    body = draw(st.binary(min_size=1 if framing else 0, max_size=300))
    if draw(st.integers(0, 9)) == 0:  # past the router's read and write buffers
        body += PATTERN * (draw(st.integers(1, LARGE)) // len(PATTERN))
    headers = [b"Host: router", b"X-Request-ID: " + rid.encode()]
    early = draw(st.integers(0, 5)) == 0
    if early:
        headers.append(b"X-Early: yes")
    for name, value in draw(st.lists(st.tuples(
            st.text("abcdefxyz-", min_size=1, max_size=8),
            st.text(VALUE_CHARS, max_size=12) | st.just("a b\tc")), max_size=3)):
        headers.append(f"x-{name}: {value}".encode())
    framing = framing or draw(st.sampled_from(
        ["length", "chunked"] if body else ["none", "length", "chunked"]))
    if body and draw(st.integers(0, 4)) == 0:
        headers.append(b"Expect: 100-continue")
    if framing == "length":
        headers.append(casing(draw, "Content-Length") + b": %d" % len(body))
        framed = body
    elif framing == "chunked":
        headers.append(casing(draw, "Transfer-Encoding") + b": "
                       + draw(st.sampled_from([b"chunked", b"Chunked"])))
        pieces, section = chunked(draw, body)
        framed = b"".join(pieces) + section
    else:
        framed = b""
    order = draw(st.permutations(range(1, len(headers))))
    headers = [headers[0], *(headers[i] for i in order)]
    line = f"{method} {target} HTTP/1.1".encode()
    parts = Parts(line, headers, framed)
    return parts, Sent(rid, method, target, body, parts.wire(), early=early)


Mutation = Callable[[st.DrawFn, Parts, bytes], Parts]
"""A valid request's parts (framed chunked, or by length: see `MUTATIONS`) and its body,
to the mutated parts."""


def _framing_at(parts: Parts, name: bytes) -> int:
    return next(i for i, h in enumerate(parts.headers) if h.lower().startswith(name))


def _replace_header(parts: Parts, name: bytes, *lines: bytes) -> Parts:
    at = _framing_at(parts, name)
    headers = [*parts.headers[:at], *lines, *parts.headers[at + 1:]]
    return dataclasses.replace(parts, headers=headers)


def _te(value: bytes, *more: bytes) -> Mutation:
    return lambda draw, parts, body: _replace_header(
        parts, b"transfer-encoding:", b"Transfer-Encoding: " + value, *more)


def _cl(value: bytes, *more: bytes) -> Mutation:
    def mutate(draw: st.DrawFn, parts: Parts, body: bytes) -> Parts:
        n = b"%d" % len(body)
        return _replace_header(parts, b"content-length:",
                               b"Content-Length: " + value.replace(b"N", n),
                               *(m.replace(b"N", n) for m in more))
    return mutate


def _first_chunk_line(value: Callable[[bytes], bytes]) -> Mutation:
    def mutate(draw: st.DrawFn, parts: Parts, body: bytes) -> Parts:
        line, _, rest = parts.framed.partition(EOL)
        size = line.split(b";")[0]
        return dataclasses.replace(parts, framed=value(size) + EOL + rest)
    return mutate


def _chunk_data(change: Callable[[bytes], bytes]) -> Mutation:
    """The first chunk's data and its CRLF, changed."""
    def mutate(draw: st.DrawFn, parts: Parts, body: bytes) -> Parts:
        line, _, rest = parts.framed.partition(EOL)
        size = int(line.split(b";")[0], 16)
        data, after = rest[:size + 2], rest[size + 2:]
        return dataclasses.replace(parts, framed=line + EOL + change(data) + after)
    return mutate


def _header(value: bytes) -> Mutation:
    def mutate(draw: st.DrawFn, parts: Parts, body: bytes) -> Parts:
        return dataclasses.replace(parts, headers=[*parts.headers[:1], value, *parts.headers[1:]])
    return mutate


def _bare_lf(draw: st.DrawFn, parts: Parts, body: bytes) -> Parts:
    at = draw(st.integers(0, len(parts.headers) - 1))
    eols = [EOL] * len(parts.headers)
    eols[at] = b"\n"
    return dataclasses.replace(parts, eols=eols)


def _fold_framing(draw: st.DrawFn, parts: Parts, body: bytes) -> Parts:
    """The framing header's value folded onto a second line."""
    at = next(i for i, h in enumerate(parts.headers)
              if h.lower().startswith((b"content-length:", b"transfer-encoding:")))
    name, _, value = parts.headers[at].partition(b":")
    headers = list(parts.headers)
    headers[at:at + 1] = [name + b":", b" " + value.strip()]
    return dataclasses.replace(parts, headers=headers)


def _line(change: Callable[[bytes], bytes]) -> Mutation:
    return lambda draw, parts, body: dataclasses.replace(parts, line=change(parts.line))


# name: (framing it applies to, mutation, must the router refuse it)
MUTATIONS: dict[str, tuple[str, Mutation, bool]] = {
    # Both framings at once (RFC 9112 6.1: a server ought to treat it as an error).
    "cl+te": ("chunked", lambda draw, parts, body: dataclasses.replace(
        parts, headers=[*parts.headers, b"Content-Length: %d" % len(parts.framed)]), True),
    "te+cl-small": ("chunked", lambda draw, parts, body: dataclasses.replace(
        parts, headers=[*parts.headers, b"Content-Length: 1"]), True),
    "cl-twice-same": ("length", _cl(b"N", b"Content-Length: N"), True),
    "cl-twice-other": ("length", _cl(b"N", b"Content-Length: 1N"), True),
    "cl-list": ("length", _cl(b"N, N"), True),
    "cl-plus": ("length", _cl(b"+N"), True),
    "cl-minus": ("length", _cl(b"-N"), True),
    "cl-hex": ("length", _cl(b"0xN"), True),
    "cl-huge": ("length", _cl(b"99999999999999999999999"), True),
    "cl-empty": ("length", _cl(b""), True),
    "cl-underscore": ("length", _cl(b"N_0"), True),
    "cl-space-inside": ("length", _cl(b"N 0"), True),
    "cl-leading-zeros": ("length", _cl(b"000N"), False),
    "cl-padded": ("length", _cl(b" N \t"), False),
    "cl-space-before-colon": ("length", lambda draw, parts, body: _replace_header(
        parts, b"content-length:", b"Content-Length : %d" % len(body)), True),
    "cl-folded": ("length", _fold_framing, True),
    "te-chunked-twice": ("chunked", _te(b"chunked, chunked"), True),
    "te-two-headers": ("chunked", _te(b"chunked", b"Transfer-Encoding: chunked"), True),
    "te-identity-chunked": ("chunked", _te(b"identity, chunked"), True),
    "te-chunked-identity": ("chunked", _te(b"chunked, identity"), True),
    "te-xchunked": ("chunked", _te(b"xchunked"), True),
    "te-chunked-param": ("chunked", _te(b"chunked;q=1"), True),
    "te-empty-element": ("chunked", _te(b", chunked"), True),
    "te-padded": ("chunked", _te(b"\tchunked "), False),
    "te-vertical-tab": ("chunked", _te(b"\x0bchunked"), True),
    "te-folded": ("chunked", _fold_framing, True),
    "te-space-before-colon": ("chunked", lambda draw, parts, body: _replace_header(
        parts, b"transfer-encoding:", b"Transfer-Encoding : chunked"), True),
    "size-not-hex": ("chunked", _first_chunk_line(lambda s: b"zz"), True),
    "size-negative": ("chunked", _first_chunk_line(lambda s: b"-" + s), True),
    "size-0x": ("chunked", _first_chunk_line(lambda s: b"0x" + s), True),
    "size-space-after": ("chunked", _first_chunk_line(lambda s: s + b" "), True),
    "size-space-before": ("chunked", _first_chunk_line(lambda s: b" " + s), True),
    "size-tab-ext": ("chunked", _first_chunk_line(lambda s: s + b"\t;a"), True),
    "size-oversized": ("chunked", _first_chunk_line(lambda s: b"f" * 17 + s), True),
    "size-overflow-64": ("chunked", _first_chunk_line(lambda s: b"1" + b"0" * 16 + s), True),
    "size-bare-lf": ("chunked", lambda draw, parts, body: dataclasses.replace(
        parts, framed=parts.framed.replace(EOL, b"\n", 1)), True),
    "size-empty": ("chunked", _first_chunk_line(lambda s: b""), True),
    "ext-empty": ("chunked", _first_chunk_line(lambda s: s + b";"), True),
    "ext-nul": ("chunked", _first_chunk_line(lambda s: s + b";a\x00"), True),
    "data-longer": ("chunked", _chunk_data(lambda d: d[:-2] + b"!" + EOL), True),
    "data-no-crlf": ("chunked", _chunk_data(lambda d: d[:-2] + b"XX"), True),
    "data-bare-lf": ("chunked", _chunk_data(lambda d: d[:-2] + b"\n"), True),
    "bare-lf-in-head": ("any", _bare_lf, True),
    "bare-cr-in-value": ("any", _header(b"X-Cr: a\rb"), True),
    "nul-in-value": ("any", _header(b"X-Nul: a\x00b"), True),
    "ctl-in-value": ("any", _header(b"X-Ctl: a\x01b"), True),
    "del-in-name": ("any", _header(b"X-D\x7fl: a"), True),
    "obs-fold": ("any", _header(b"X-Folded: a\r\n b"), True),
    "space-in-name": ("any", _header(b"X Name: a"), True),
    "no-colon": ("any", _header(b"X-No-Colon"), True),
    "nul-in-target": ("any", _line(lambda line: line.replace(b" /", b" /\x00", 1)), True),
    # llhttp takes repeated spaces between the request line's words (RFC 9112 3 lets a
    # recipient parse on whitespace boundaries): the request is as meant, framing untouched.
    "double-space-line": ("any", _line(lambda line: line.replace(b" ", b"  ", 1)), False),
    "lowercase-version": ("any", _line(lambda line: line.replace(b"HTTP/", b"http/")), True),
    # Refused by the router itself, before the body is read, the connection kept: the
    # parser still frames the unread body, so the requests behind it are served as sent.
    "bad-pin": ("any", _header(b"X-Sandbox-ID: -bad-"), True),
    "bad-pin-port": ("any", _header(b"X-Sandbox-ID: raw-0\r\nX-Sandbox-Port: +1"), True),
    "no-host": ("any", lambda draw, parts, body: dataclasses.replace(
        parts, headers=parts.headers[1:]), True),
    "two-hosts": ("any", _header(b"Host: other"), True),
    "gzip": ("chunked", _te(b"gzip, chunked"), True),
    # The last request on its connection: it is answered, and nothing behind it reaches a
    # pod (RFC 9112 9.6).
    "connection-close": ("any", _header(b"Connection: close"), False),
    "http-1.0": ("any", _line(lambda line: line.replace(b"HTTP/1.1", b"HTTP/1.0")), False),
    "http-1.0-chunked": ("chunked", _line(lambda line: line.replace(b"HTTP/1.1", b"HTTP/1.0")),
                         False),
    "underscore-te": ("chunked", _te(b"chunked", b"Transfer_Encoding: chunked"), False),
    "connection-names-cl": ("length", _header(b"Connection: content-length"), False),
}


@st.composite
def mutated_request(draw: st.DrawFn, rid: str, name: str) -> tuple[Parts, Sent]:
    framing, mutate, refuse = MUTATIONS[name]
    parts, sent = draw(valid_request(rid, framing if framing != "any" else None))
    mutated = mutate(draw, parts, sent.body)
    return mutated, dataclasses.replace(sent, data=mutated.wire(), mutation=name, refuse=refuse)


@st.composite
def pipeline(draw: st.DrawFn, example: int, mutation: str | None = None
             ) -> tuple[list[Sent], list[int]]:
    """1-3 requests (one with `mutation`, if given), and where their bytes are cut into
    writes."""
    count = draw(st.integers(1, 3))
    bad = draw(st.integers(0, count - 1)) if mutation is not None else -1
    sent = []
    for index in range(count):
        rid = f"ex{example:06d}-{index}"  # one width: the same draws make the same bytes
        _, request = draw(mutated_request(rid, mutation) if mutation is not None and index == bad
                          else valid_request(rid))
        sent.append(request)
    size = sum(len(s.data) for s in sent)
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, size - 1)), max_size=4))))
    return sent, cuts


# -- the pod: h11 parses what the router sends --


@dataclasses.dataclass(frozen=True)
class Received:
    """A request the pod's h11 read whole."""

    id: str
    method: str
    target: bytes
    body: bytes
    pod: str


class H11Pod:
    """A raw pod behaviour (tests/rawpod.py): every connection is parsed by h11; each
    whole request is recorded and answered `200` with `x-got: <id> <body digest>` (a
    header, so HEAD answers carry it too); one with `X-Early` is answered `x-got: <id>
    early` as soon as its head is in, and its body read after. What h11 refuses is
    recorded as a violation and the connection closed. `settled` waits until no
    connection is inside a request. Pods named in `busy` answer `503` instead (`x-got:
    <id> busy`): the router tries the next pod if it can send the body again."""

    def __init__(self, busy: frozenset[str] = frozenset()) -> None:
        self.busy = busy
        self.changed = threading.Condition()
        self.received: list[Received] = []
        self.violations: list[tuple[str, bytes]] = []
        self._inside: set[PodConnection] = set()  # with part of a request read

    def __call__(self, connection: PodConnection) -> None:
        parser = h11.Connection(h11.SERVER)
        request: h11.Request | None = None
        body = bytearray()
        ended = False  # the router closed the connection
        try:
            while True:
                event = parser.next_event()
                if event is h11.NEED_DATA:
                    self._mark(connection, request is not None
                               or bool(parser.trailing_data[0]))
                    data = connection._recv()
                    ended = not data
                    parser.receive_data(data)
                elif isinstance(event, h11.Request):
                    request, body = event, bytearray()
                    if dict(request.headers).get(b"x-early") == b"yes":
                        rid = dict(request.headers).get(b"x-request-id", b"").decode()
                        if not self._answer(connection, parser, f"{rid} early"):
                            return
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    assert request is not None
                    rid = dict(request.headers).get(b"x-request-id", b"").decode()
                    with self.changed:
                        self.received.append(Received(rid, request.method.decode(),
                                                      request.target, bytes(body),
                                                      connection.pod.name))
                    busy = connection.pod.name in self.busy
                    got = f"{rid} busy" if busy else f"{rid} {digest(bytes(body))}"
                    if (parser.our_state is h11.SEND_RESPONSE
                            and not self._answer(connection, parser, got, 503 if busy else 200)):
                        return
                    parser.start_next_cycle()
                    request = None
                else:  # ConnectionClosed (or PAUSED: never, answers are sent at once)
                    return
        except h11.RemoteProtocolError as error:
            if not ended:  # else the router closed inside a request: it never ended whole
                with self.changed:
                    self.violations.append((str(error), bytes(connection.raw)))
        finally:
            self._mark(connection, False)

    def _answer(self, connection: PodConnection, parser: h11.Connection, got: str,
                status: int = 200) -> bool:
        answer = [h11.Response(status_code=status, headers=[("content-length", "0"),
                                                            ("x-got", got)]),
                  h11.EndOfMessage()]
        return connection.send(b"".join(parser.send(e) or b"" for e in answer))

    def _mark(self, connection: PodConnection, inside: bool) -> None:
        with self.changed:
            if inside:
                self._inside.add(connection)
            else:
                self._inside.discard(connection)
            self.changed.notify_all()

    def settled(self) -> bool:
        """Waits (bounded) until no connection has part of a request read and unfinished:
        the router closes a pod connection whose request it gives up on."""
        with self.changed:
            return self.changed.wait_for(lambda: not self._inside, WAIT)


# -- the client: h11 reads the router's answers --


@dataclasses.dataclass
class Got:
    """One answer the client read whole."""

    status: int
    headers: dict[bytes, bytes]
    body: bytes


@dataclasses.dataclass
class Outcome:
    answers: list[Got]
    cut: str | None  # why reading stopped short of an answer (h11's error), if it did
    data: bytes  # every byte the client read


def send_and_read(port: int, data: bytes, cuts: list[int], methods: list[str],
                  quiet: float | None = None, leave: bool = False) -> Outcome:
    """Send `data` in writes cut at `cuts`, then read answers (one per method, in order)
    until they are all in, the router ends the connection or says it will. `quiet`: after
    that long without a byte from the router, half-close (for a request the router may be
    waiting on the rest of: a malformed one); without it, wait up to `WAIT`. `leave`:
    half-close at once, the client gone as far as HTTP goes."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        at = 0
        for cut in [*cuts, len(data)]:
            try:
                sock.sendall(data[at:cut])
            except OSError:  # the router refused and closed: the rest is not sent
                break
            at = cut
        if leave:
            sock.shutdown(socket.SHUT_WR)
        return _read(sock, methods, quiet)
    finally:
        sock.close()


def _read(sock: socket.socket, methods: list[str], quiet: float | None) -> Outcome:
    parser = h11.Connection(h11.CLIENT)
    answers: list[Got] = []
    seen = bytearray()
    half_closed = False
    sock.settimeout(quiet if quiet is not None else WAIT)
    for method in methods:
        parser.send(h11.Request(method=method, target="/", headers=[("host", "router")]))
        parser.send(h11.EndOfMessage())
        got: Got | None = None
        body = bytearray()
        while True:
            try:
                event = parser.next_event()
            except h11.RemoteProtocolError as error:
                return Outcome(answers, str(error), bytes(seen))
            if event is h11.NEED_DATA:
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    if half_closed or quiet is None:
                        raise
                    sock.shutdown(socket.SHUT_WR)
                    half_closed = True
                    sock.settimeout(WAIT)
                    continue
                except ConnectionResetError:
                    data = b""
                seen += data
                parser.receive_data(data)
            elif isinstance(event, h11.Response):
                got = Got(event.status_code, dict(event.headers), b"")
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert got is not None
                got.body = bytes(body)
                answers.append(got)
                break
            elif isinstance(event, h11.ConnectionClosed):
                return Outcome(answers, None, bytes(seen))
            # h11.InformationalResponse (100 Continue): the final answer follows
        if parser.our_state is h11.MUST_CLOSE or parser.their_state is h11.MUST_CLOSE:
            return Outcome(answers, None, bytes(seen))
        parser.start_next_cycle()
    return Outcome(answers, None, bytes(seen))


# -- pod answers --


@dataclasses.dataclass
class Scripted:
    """One pod answer: the bytes it writes (in these pieces), whether it then closes the
    connection, and what it means: its final status and body (de-chunked; empty where
    the request or status has none). `refuse`: the router must not pass it on whole (a 502,
    or the client's connection cut); else it may, exactly as meant."""

    pieces: list[bytes]
    close: bool
    status: int
    body: bytes
    mutation: str | None = None
    refuse: bool = False


INTERIM = [b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 102 Processing\r\n\r\n",
           b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n"]
STATUSES = [200, 201, 203, 206, 301, 404, 410, 500, 502, 504]
"""Final statuses with a body (not 503: for a replayable request the router tries the
next pod, then answers its own 503)."""


@st.composite
def valid_answer(draw: st.DrawFn, head_only: bool, framing: str | None = None,
                 close: bool = False, bodied: bool = False, keep: bool = False) -> Scripted:
    """A well-formed answer to a GET (or, `head_only`, a HEAD); the pod closes after it if
    `close` (or at random), and then says so (`Connection: close`) unless the close ends
    its body: a keep-alive connection closed just after an answer is the pod's race to
    lose (the router's next request on it fails, and is never resent: router/replay.py).
    `bodied`: a status with a body, and a body. `keep`: the connection stays open."""
    bodiless = None if bodied else draw(st.sampled_from([None, None, None, 204, 304]))
    status = bodiless or draw(st.sampled_from(STATUSES))
    body = b"" if bodiless else draw(st.binary(min_size=int(bodied), max_size=400))
    if body and draw(st.integers(0, 9)) == 0:  # past the router's buffers and join limits
        body += PATTERN * (draw(st.integers(1, ANSWER_LARGE)) // len(PATTERN))
    headers = [b"x-pod: yes"]
    for name, value in draw(st.lists(st.tuples(st.text("abcdefxyz-", min_size=1, max_size=8),
                                               st.text(VALUE_CHARS, max_size=12)),
                                     max_size=3)):
        headers.append(f"x-{name}: {value}".encode())
    framing = framing or draw(st.sampled_from(["length", "chunked", "close"]))
    delimited = framing == "close" and not bodiless
    close = not keep and (close or delimited or draw(st.integers(0, 3)) == 0)
    if close and (not delimited or draw(st.booleans())):
        headers.append(b"Connection: close")
    if framing == "length" and bodiless != 204:
        headers.append(casing(draw, "Content-Length") + b": %d" % len(body))
        framed = body
    elif framing == "chunked" and not bodiless:
        headers.append(casing(draw, "Transfer-Encoding") + b": chunked")
        pieces, section = chunked(draw, body)
        framed = b"".join(pieces) + section
    else:
        framed = body
    if head_only or bodiless:
        framed, body = b"", b""
    interim = draw(st.lists(st.sampled_from(INTERIM), max_size=2))
    order = draw(st.permutations(range(len(headers))))
    head = b"HTTP/1.1 %d Whatever\r\n" % status + b"".join(headers[i] + EOL for i in order) + EOL
    data = b"".join(interim) + head + framed
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=3))))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    return Scripted([p for p in pieces if p], close, status, body)


def _answer_head(parts: Scripted) -> tuple[bytes, bytes, bytes]:
    """The interim heads, the final head and what follows it."""
    data = b"".join(parts.pieces)
    interim = b""
    while data.startswith(b"HTTP/1.1 1"):
        head, _, data = data.partition(b"\r\n\r\n")
        interim += head + b"\r\n\r\n"
    head, _, rest = data.partition(b"\r\n\r\n")
    return interim, head + b"\r\n\r\n", rest


def _with_head(scripted: Scripted, change: Callable[[bytes], bytes]) -> Scripted:
    interim, head, rest = _answer_head(scripted)
    return dataclasses.replace(scripted, pieces=[interim + change(head) + rest])


def _add(line: bytes) -> Callable[[Scripted], Scripted]:
    return lambda s: _with_head(s, lambda head: head[:-2] + line + EOL + EOL)


def _set_framing(name: bytes, value: bytes) -> Callable[[Scripted], Scripted]:
    """The framing header named `name` given `value` (`N` stands for the body's length)."""
    def change(scripted: Scripted) -> Scripted:
        def rewrite(head: bytes) -> bytes:
            lines = head.split(EOL)
            for index, line in enumerate(lines):
                if line.lower().startswith(name + b":"):
                    lines[index] = name + b": " + value.replace(b"N", b"%d" % len(scripted.body))
            return EOL.join(lines)
        return _with_head(scripted, rewrite)
    return change


SMUGGLED = b"HTTP/1.1 200 OK\r\nx-pod: yes\r\ncontent-length: 7\r\n\r\nsmuggle"


def _then(scripted: Scripted, more: bytes) -> Scripted:
    """`more` right behind the answer, in the same write (one segment on loopback, so the
    router reads it with the answer's end)."""
    return dataclasses.replace(scripted, pieces=[*scripted.pieces[:-1],
                                                 scripted.pieces[-1] + more])


def _bodiless(status: int, framing: bytes, after: bytes) -> Scripted:
    """A `status` answer (204 or 304) whose head declares a body (`framing`), and `after`
    sent right behind it as one."""
    head = b"HTTP/1.1 %d X\r\nx-pod: yes\r\n%b\r\n" % (status, framing)
    return Scripted([head + after], False, status, b"")


def _body(change: Callable[[bytes], bytes]) -> Callable[[Scripted], Scripted]:
    def mutate(scripted: Scripted) -> Scripted:
        interim, head, rest = _answer_head(scripted)
        return dataclasses.replace(scripted, pieces=[interim + head + change(rest)])
    return mutate


# name: (framing it applies to, mutation, must the router refuse it)
ANSWER_MUTATIONS: dict[str, tuple[str, Callable[[Scripted], Scripted], bool]] = {
    "cl+te": ("chunked", _add(b"Content-Length: 3"), True),
    "te+cl": ("length", _add(b"Transfer-Encoding: chunked"), True),
    "cl-twice-other": ("length", _add(b"Content-Length: 1"), True),
    "cl-twice-same": ("length", lambda s: _add(b"Content-Length: %d" % len(s.body))(s), True),
    "cl-list": ("length", _set_framing(b"content-length", b"N, N"), True),
    "cl-plus": ("length", _set_framing(b"content-length", b"+N"), True),
    "cl-minus": ("length", _set_framing(b"content-length", b"-N"), True),
    "cl-hex": ("length", _set_framing(b"content-length", b"0xN"), True),
    "cl-underscore": ("length", _set_framing(b"content-length", b"N_0"), True),
    "cl-space-inside": ("length", _set_framing(b"content-length", b"N 0"), True),
    "cl-huge": ("length", _set_framing(b"content-length", b"99999999999999999999999"), True),
    "cl-padded": ("length", _set_framing(b"content-length", b"\tN \t"), False),
    "cl-leading-zeros": ("length", _set_framing(b"content-length", b"00N"), False),
    "cl-larger": ("length", _set_framing(b"content-length", b"1N"), True),
    "te-twice": ("chunked", _set_framing(b"transfer-encoding", b"chunked, chunked"), True),
    "te-identity": ("chunked", _set_framing(b"transfer-encoding", b"identity"), True),
    "te-xchunked": ("chunked", _set_framing(b"transfer-encoding", b"xchunked"), True),
    "te-param": ("chunked", _set_framing(b"transfer-encoding", b"chunked;q=1"), True),
    "te-padded": ("chunked", _set_framing(b"transfer-encoding", b" chunked\t"), False),
    "te-empty": ("chunked", _set_framing(b"transfer-encoding", b""), True),
    "size-not-hex": ("chunked", _body(lambda b: b"zz" + b[b.index(EOL):]), True),
    "size-negative": ("chunked", _body(lambda b: b"-" + b), True),
    "size-0x": ("chunked", _body(lambda b: b"0x" + b), True),
    "size-space-before": ("chunked", _body(lambda b: b" " + b), True),
    "size-oversized": ("chunked", _body(lambda b: b"f" * 17 + b), True),
    "size-overflow-64": ("chunked", _body(lambda b: b"1" + b"0" * 16 + b), True),
    "size-bare-lf": ("chunked", _body(lambda b: b.replace(EOL, b"\n", 1)), True),
    "chunks-unfinished": ("chunked", _body(lambda b: b[:b.rindex(b"\r\n0")]), True),
    "chunk-data-longer": ("chunked", _body(lambda b: b.replace(EOL, b"!" + EOL, 2)), True),
    "length-short": ("length", _body(lambda b: b[:-1]), True),
    "obs-fold": ("any", _add(b"X-Folded: a\r\n b"), True),
    "folded-length": ("length", lambda s: _with_head(s, lambda h: re.sub(
        rb"(?i)(content-length:) ", rb"\1\r\n ", h, count=1)), True),
    "bare-lf-head": ("any", lambda s: _with_head(s, lambda h: h.replace(b"x-pod: yes\r\n",
                                                                         b"x-pod: yes\n")), True),
    "nul-in-value": ("any", _add(b"X-Nul: a\x00b"), True),
    "bare-cr-in-value": ("any", _add(b"X-Cr: a\rb"), True),
    "huge-head": ("any", _add(b"X-Huge: " + b"h" * 5000), True),
    "interim-with-body": ("any", lambda s: dataclasses.replace(
        s, pieces=[b"HTTP/1.1 100 Continue\r\ncontent-length: 3\r\n\r\nabc", *s.pieces]), True),
    "status-600": ("any", lambda s: _with_head(s, lambda h: b"HTTP/1.1 600" + h[12:]), True),
    "status-two-digits": ("any", lambda s: _with_head(s, lambda h: b"HTTP/1.1 20" + h[12:]),
                          True),
    # llhttp reads a 2.0 status line with 1.x framing (and, minor 0, no keep-alive): the
    # router relays the answer as 1.1, body as framed. Not refused, and not a framing break.
    "http-2": ("any", lambda s: _with_head(s, lambda h: b"HTTP/2.0" + h[8:]), False),
    # `Connection` naming the framing header: the router drops it, and frames the answer
    # itself (chunked).
    "connection-names-cl": ("length", _add(b"Connection: content-length"), False),
    "connection-names-te": ("chunked", _add(b"Connection: transfer-encoding"), False),
    # A second answer nobody asked for, behind a whole one, the connection kept open (and
    # so, but for the router, pooled): the first passes, the second never does.
    "second-answer": ("length", lambda s: _then(s, SMUGGLED), False),
    "second-answer-chunked": ("chunked", lambda s: _then(s, SMUGGLED), False),
    "head-with-body": ("head", lambda s: _then(s, SMUGGLED), False),
    # A 204 or 304 has no body, whatever its head says (RFC 9110 6.4.1): the client gets
    # none, and what the pod sent as one never becomes an answer.
    "304-with-length": ("any", lambda s: _bodiless(304, b"Content-Length: 10\r\n", b""), False),
    "204-with-body": ("any", lambda s: _bodiless(204, b"Content-Length: 7\r\n", b"abcdefg"),
                      False),
    "304-chunked": ("any", lambda s: _bodiless(304, b"Transfer-Encoding: chunked\r\n",
                                               b"3\r\nabc\r\n0\r\n\r\n"), False),
    "204-smuggling": ("any", lambda s: _bodiless(204, b"Content-Length: %d\r\n" % len(SMUGGLED),
                                                 SMUGGLED), False),
}
KEPT = ("second-answer", "second-answer-chunked", "head-with-body", "304-with-length",
        "204-with-body", "304-chunked", "204-smuggling")
"""After these the pod keeps the connection open."""


@st.composite
def mutated_answer(draw: st.DrawFn, head_only: bool, name: str) -> Scripted:
    """A valid answer (to a HEAD if `head_only`), with mutation `name`. The pod closes the
    connection after it, unless the mutation is one of `KEPT`."""
    applies, mutate, refuse = ANSWER_MUTATIONS[name]
    kept = name in KEPT
    framing: str | None = applies
    if applies in ("any", "head"):
        framing = draw(st.sampled_from(["length", "chunked"])) if kept else None
    scripted = draw(valid_answer(head_only, framing, not kept, True, kept))
    mutated = mutate(scripted)
    return dataclasses.replace(mutated, close=not kept, mutation=name, refuse=refuse)


class ScriptedPod:
    """A raw pod behaviour: reads each request (no body) and answers `/a/<key>` with
    `answers[key]`, anything else with `ok <path>`; closes after an answer that says so."""

    def __init__(self) -> None:
        self.answers: dict[str, Scripted] = {}

    def __call__(self, connection: PodConnection) -> None:
        connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while (request := connection.read_request()) is not None:
            path = request.head.split(b" ")[1].decode()
            scripted = self.answers.get(path.removeprefix("/a/"))
            if scripted is None:
                body = b"ok " + path.encode()
                connection.send(b"HTTP/1.1 200 OK\r\nx-pod: yes\r\ncontent-length: %d\r\n\r\n"
                                % len(body) + body)
                continue
            for piece in scripted.pieces:
                if not connection.send(piece):
                    return
            if scripted.close:
                return
