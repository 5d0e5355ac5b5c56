"""Logs: one JSON object per line, access lines for proxied requests only, no query
strings; seen from the real command's output."""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import time
import types

import httpx
import pytest

from router import logs, protocol, upstream
from router.logs import (
    FLUSH_BATCH,
    PIPE_BUF,
    REPEAT_INTERVAL,
    AccessLog,
    JsonFormatter,
    Repeated,
    StderrLines,
    access_line,
    write_lines,
)
from router.observe import Exchange
from tests import rawpod
from tests.conftest import (
    StartPods,
    StartRawPods,
    StartRouter,
    eventually,
    names_lookup,
    static_config,
)
from tests.process import RouterProcess
from tests.rawclient import RawClient, request

ACCESS_KEYS = {"time", "method", "path", "status", "duration_ms", "route", "pod", "namespace",
               "attempts", "bytes_in", "bytes_out", "client", "request_id"}


def test_every_line_is_json_and_each_proxied_request_has_one_access_line(
    start_pods: StartPods,
) -> None:
    pods = start_pods(2)
    pods[0].app.mode = "busy"
    listed = ",".join(f"{pod.name}={pod.ip}:{pod.port}" for pod in pods)
    router = RouterProcess(["--pods", listed])
    try:
        with httpx.Client(base_url=router.url) as client:
            # The router starts its round robin at a random pod: with two, one of these
            # two requests tries busy pod-0 first (attempts 2), the other goes to pod-1.
            tried = [pods[0].app.hits]
            first = client.get("/items/7?token=s3cret", headers={"X-Request-ID": "req-1"})
            tried.append(pods[0].app.hits)
            second = client.post("/upload?sig=s3cret", content=b"x" * 1234)
            tried.append(pods[0].app.hits)
            pinned = client.get("/", headers={"X-Sandbox-ID": "pod-0"})
            for probe in ("/healthz", "/ready", "/readyz"):
                assert client.get(probe).status_code == 200
    finally:
        assert router.stop() == 0
    output = "".join(router.lines)
    entries = [json.loads(line) for line in router.lines]  # every line is JSON

    assert "s3cret" not in output
    access = [entry for entry in entries if "request_id" in entry]
    assert [set(entry) for entry in access] == [ACCESS_KEYS] * 3
    assert [(e["method"], e["path"], e["status"], e["route"], e["pod"], e["attempts"])
            for e in access] == [
        ("GET", "/items/7", 200, "pool", "pod-1", 1 + tried[1] - tried[0]),
        ("POST", "/upload", 200, "pool", "pod-1", 1 + tried[2] - tried[1]),
        ("GET", "/", 503, "pinned", "pod-0", 1),
    ]
    assert tried[2] - tried[0] == 1
    assert access[0]["request_id"] == "req-1" == first.headers["x-request-id"]
    assert access[1]["request_id"] == second.headers["x-request-id"]
    assert access[1]["bytes_in"] == 1234
    assert access[1]["bytes_out"] == len(second.content)
    assert access[2]["bytes_out"] == len(pinned.content)
    assert {e["namespace"] for e in access} == {"default"}
    assert {e["client"] for e in access} == {"127.0.0.1"}
    assert all(e["duration_ms"] > 0 for e in access)

    lifecycle = [e for e in entries if "request_id" not in e]
    assert all({"time", "level", "logger", "message"} <= set(e) for e in lifecycle)
    assert any("running on" in e["message"] for e in lifecycle)
    assert any("Shutting down" in e["message"] for e in lifecycle)


def test_no_access_log_writes_no_access_lines(start_pods: StartPods) -> None:
    pod = start_pods(1)[0]
    router = RouterProcess(["--pods", f"{pod.ip}:{pod.port}", "--no-access-log"])
    try:
        assert httpx.get(router.url + "/").status_code == 200
    finally:
        assert router.stop() == 0
    assert pod.app.hits == 1
    assert not [line for line in router.lines if "request_id" in json.loads(line)]


def test_a_full_buffer_drops_lines_and_counts_them() -> None:
    stream = io.StringIO()
    access = AccessLog(stream, capacity=2)
    for index in range(3):
        access.request_finished(Exchange("GET", f"/{index}", None, f"id-{index}", "pool", 0.0))
    access.start()
    access.stop()

    assert access.dropped == 1
    assert [json.loads(line)["path"] for line in stream.getvalue().splitlines()] == ["/0", "/1"]


class Writes(io.StringIO):
    """A stream that keeps each write apart; the first `failing` writes raise."""

    def __init__(self, failing: int = 0) -> None:
        super().__init__()
        self.writes: list[str] = []
        self.failing = failing

    def write(self, text: str) -> int:
        if self.failing:
            self.failing -= 1
            raise OSError(28, "No space left on device")
        self.writes.append(text)
        return len(text)


def test_lines_are_written_in_batches_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer formats and writes `FLUSH_BATCH` lines at a time and hands the GIL to
    the event loop between batches (formatting them all at once held it for a switch
    interval): pending lines spanning several batches (and a last, partial one) come out
    in batches, in order, each line whole, with a hand-over after each batch."""
    handed_over: list[float] = []
    monkeypatch.setattr(logs, "time", types.SimpleNamespace(time=time.time,
                                                            sleep=handed_over.append))
    stream = Writes()
    access = AccessLog(stream)
    count = FLUSH_BATCH * 2 + 5
    for index in range(count):
        access.request_finished(Exchange("GET", f"/{index}", None, f"id-{index}", "pool", 0.0))
    access._flush()  # what the writer thread runs, here in the test's own thread

    assert handed_over == [0, 0, 0]  # after each batch
    assert all(len(write) <= PIPE_BUF and write.endswith("\n") for write in stream.writes)
    assert [json.loads(line)["path"] for line in "".join(stream.writes).splitlines()] == [
        f"/{index}" for index in range(count)]


def test_access_lines_are_json_whatever_the_path_holds() -> None:
    exchange = Exchange("GET", '/a "quoted"\\path/é\n', "::1", 'id-"1"', "pinned", 0.0,
                        status=404, pod="sbx", namespace="team", attempts=1, duration=0.0015)
    entry = json.loads(access_line(exchange, 1764000000.25))

    assert entry == {
        "time": "2025-11-24T16:00:00.250+00:00", "method": "GET",
        "path": '/a "quoted"\\path/é\n', "status": 404, "duration_ms": 1.5, "route": "pinned",
        "pod": "sbx", "namespace": "team", "attempts": 1, "bytes_in": 0, "bytes_out": 0,
        "client": "::1", "request_id": 'id-"1"',
    }


CUT_SHORT = 1000
"""Warnings of about 200 bytes each: three times what a pipe holds (64 KiB)."""


def cut_short(connection: rawpod.PodConnection) -> None:
    """A sandbox that fails each answer once it has begun: 2 bytes of the 10 it says."""
    if connection.read_request() is not None:
        connection.send(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nok")


def test_a_stalled_stderr_holds_no_request(start_raw_pods: StartRawPods) -> None:
    """Its reader stalled (a log collector behind), stderr fills; every answer a pod cuts
    short logs a warning. Written on the event loop, the line that found the pipe full
    had stopped the router, every request with it; now a writer thread waits instead,
    and the lines, below its buffer's 10,000, all come out once stderr drains."""
    pod = start_raw_pods(cut_short)[0]
    router = RouterProcess(["--pods", f"{pod.ip}:{pod.port}", "--no-access-log"])
    try:
        router.pause()
        for _ in range(CUT_SHORT):
            client = RawClient(router.port)
            client.send(b"GET / HTTP/1.1\r\nHost: r\r\n\r\n")
            assert client.closed()  # the answer's head and 2 bytes, then the end
            client.close()
        pod.behaviour = rawpod.answering(rawpod.OK)
        assert httpx.get(router.url, timeout=10).status_code == 200
    finally:
        assert router.stop() == 0
    warnings = [line for line in router.lines if "upstream failed mid-response" in line]
    assert len(warnings) == CUT_SHORT


def test_a_flood_of_warnings_any_client_can_cause_is_a_line_every_ten_seconds(
    start_raw_pods: StartRawPods, start_router: StartRouter, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A malformed request is a warning, as in uvicorn, and so is a pinned name whose
    address the policy refuses; a client sends them at will. A line each was the client's
    to write: stderr's queue then dropped the warnings an operator acts on. Each kind now
    writes a line, then none for ten seconds; the access log still has every request."""
    clock = [0.0]
    for module, name in [(protocol, "_BAD_REQUESTS"), (upstream, "_REFUSED")]:
        kind: Repeated = getattr(module, name)  # a fresh one: earlier tests used the real
        monkeypatch.setattr(module, name, Repeated(kind._logger, kind._message,
                                                   clock=lambda: clock[0]))
    pod = start_raw_pods(rawpod.answering(rawpod.OK))[0]
    api_server = "kubernetes.default.svc.cluster.local"  # an address no caller may reach
    client = start_router(static_config([pod]), lookup=names_lookup({api_server: "127.0.0.3"}))
    refused = f"refused to connect to {api_server} (127.0.0.3): address not allowed"
    port = client.base_url.port
    assert port is not None
    caplog.set_level("WARNING")

    def flood() -> list[str]:
        caplog.clear()
        for _ in range(20):
            answer = request(port, b"NOT HTTP AT ALL\r\n\r\n")
            assert answer is not None and answer.status == 400
            assert client.get("/", headers={"X-Sandbox-ID": "kubernetes"}).status_code == 502
        return [record.getMessage() for record in caplog.records
                if record.getMessage().startswith((protocol.BAD_REQUEST, refused))]

    assert flood() == [protocol.BAD_REQUEST, refused]
    clock[0] += REPEAT_INTERVAL
    assert flood() == [f"{protocol.BAD_REQUEST}; 19 more since the last line",
                       f"{refused}; 19 more since the last line"]


def test_stderr_lines_past_the_buffer_are_dropped_and_counted() -> None:
    """A stream nobody reads: logging returns at once whatever it holds, what is past
    the buffer is dropped, and the next write says how many lines were."""
    read_end, write_end = os.pipe()
    stream = os.fdopen(write_end, "w")
    handler = StderrLines(stream, capacity=5)
    handler.setFormatter(JsonFormatter())
    logger = logging.Logger("stalled")
    logger.addHandler(handler)
    message = "x" * 20_000  # three fill the pipe

    def log_all() -> None:
        for index in range(40):
            logger.warning("%d %s", index, message)

    logging_thread = threading.Thread(target=log_all, daemon=True)
    logging_thread.start()
    logging_thread.join(10)
    assert not logging_thread.is_alive()  # no call waited for the stream
    read: list[str] = []
    reader = threading.Thread(target=lambda: read.extend(os.fdopen(read_end)), daemon=True)
    reader.start()
    handler.close()  # writes what is left, the reader draining the pipe
    stream.close()
    reader.join(10)
    assert not reader.is_alive()
    lines = [json.loads(line) for line in read]
    kept = [line for line in lines if line["message"].endswith(message)]
    assert [int(line["message"].split()[0]) for line in kept] == sorted(
        int(line["message"].split()[0]) for line in kept)  # in order
    # The last report has the final count. It need not be the last line: a write under way
    # when the last line was dropped reported, and lines kept after it follow.
    reports = [line["message"] for line in lines if line["message"].endswith("keeping up")]
    assert reports[-1] == f"{handler.dropped} log lines dropped so far: stderr is not keeping up"
    assert handler.dropped > 0 and len(kept) + handler.dropped == 40


def test_lines_are_written_whole_and_at_most_pipe_buf_bytes_at_a_time() -> None:
    """`--workers` processes share one stdout and one stderr pipe: a larger write is
    interleaved with another process's mid-line (a helper saw 91 of 24,000 JSON lines
    broken with three writers)."""
    lines = [json.dumps({"n": index, "pad": "x" * (index % 700)}) for index in range(500)]
    lines.append(json.dumps({"big": "y" * (2 * PIPE_BUF)}))  # alone in its write
    stream = Writes()
    write_lines(stream, lines)
    assert "".join(stream.writes).splitlines() == lines
    assert all(write.endswith("\n") for write in stream.writes)
    assert [len(write) for write in stream.writes if len(write) > PIPE_BUF] == [
        len(lines[-1]) + 1]


def test_a_failed_stderr_write_loses_its_lines_not_the_writer() -> None:
    """A disk full for a moment (`2>>file`): the lines of that write are lost, and the
    thread goes on; it had ended, every later line then held until exit."""
    stream = Writes(failing=1)
    handler = StderrLines(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.Logger("failing")
    logger.addHandler(handler)
    logger.warning("lost with the failed write")
    eventually(lambda: stream.failing == 0)
    logger.warning("written")
    eventually(lambda: any("written" in write for write in stream.writes))
    handler.close()
