"""Logs as JSON, one object per line: the access log on stdout, everything else (errors,
pod-list changes, API failures, start and shutdown) on stderr.

Neither is written on the event loop. The proxy hands each finished `Exchange` to a
bounded buffer, and a writer thread formats and writes the lines ten times a second; every
other line is formatted where it is logged and written by a thread of `StderrLines`. If a
stream stalls long enough to fill its buffer, lines are dropped and counted rather than
stopping the loop: a log collector that falls behind, or a pipe nobody reads, had held
every request still to be served at the next warning (and clients can make warnings: a
malformed request is one).
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Container, Hashable
from datetime import UTC, datetime
from json.encoder import encode_basestring_ascii
from typing import Any, Generic, TextIO, TypeVar

from router.observe import Exchange, NullObserver

QUEUE_LINES = 10_000
FLUSH_SECONDS = 0.1
FLUSH_BATCH = 64
"""Lines formatted between two hand-overs of the GIL to the event loop (below)."""
STOP_SECONDS = 5.0
PIPE_BUF = 4096
"""Bytes a pipe takes in one piece (POSIX's least, Linux's value): `--workers` processes
share the supervisor's stdout and stderr, and a larger write of one is interleaved with
the others' mid-line, which a log collector then reads as broken JSON."""

log = logging.getLogger("router.access")

Key = TypeVar("Key", bound=Hashable)


@functools.lru_cache(maxsize=4)
def _second(whole: int) -> str:
    return datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _timestamp(seconds: float) -> str:
    """ISO 8601 in UTC with milliseconds; the formatted second is reused within it."""
    whole = int(seconds)
    return f"{_second(whole)}.{int((seconds - whole) * 1000):03d}+00:00"


class JsonFormatter(logging.Formatter):
    """`{"time", "level", "logger", "message"}` plus `error` with the traceback, if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class StderrLines(logging.Handler):
    """Formatted lines for stderr, written by a thread of its own from a buffer of at most
    `capacity` lines (see the module); past it, lines are dropped, and the next write says
    how many so far. `flush` writes what is pending in the caller's thread: logging calls it
    at exit, and at a reconfiguration, so no line of a clean exit is lost."""

    def __init__(self, stream: TextIO | None = None, capacity: int = QUEUE_LINES) -> None:
        super().__init__()
        self._stream = stream if stream is not None else sys.stderr
        self._capacity = capacity
        self._pending: collections.deque[str] = collections.deque()
        self._wake = threading.Event()
        self._writing = threading.Lock()  # the thread's writes and `flush`'s, one at a time
        self._thread: threading.Thread | None = None
        self._closed = False
        self.dropped = 0
        self._reported = 0

    def emit(self, record: logging.LogRecord) -> None:
        """Called with the handler's lock held, so one emit at a time, whatever thread."""
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        if len(self._pending) < self._capacity:
            self._pending.append(line)
        else:
            self.dropped += 1
        if self._thread is None and not self._closed:
            self._thread = threading.Thread(target=self._run, name="stderr-log", daemon=True)
            self._thread.start()
        self._wake.set()

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait()
            self._wake.clear()
            try:
                self.flush()
            except Exception:  # ENOSPC, EIO, EPIPE: those lines are lost, not the thread
                time.sleep(FLUSH_SECONDS)  # and no spin against a stream that keeps failing

    def flush(self) -> None:
        with self._writing:
            pending = self._pending
            lines = [pending.popleft() for _ in range(len(pending))]
            dropped = self.dropped
            if dropped > self._reported:
                self._reported = dropped
                lines.append(json.dumps({
                    "time": _timestamp(time.time()), "level": "warning", "logger": __name__,
                    "message": f"{dropped} log lines dropped so far: stderr is not keeping up",
                }))
            write_lines(self._stream, lines)

    def close(self) -> None:
        """At exit or a reconfiguration: what is pending is written, the thread ends."""
        self.flush()
        self._closed = True
        self._wake.set()
        super().close()


def logging_config(level: str) -> dict[str, Any]:
    """A `dictConfig` for the process (and each worker): every logger, uvicorn's included,
    goes to one JSON handler on stderr."""
    numeric = 5 if level == "trace" else level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {"stderr": {"()": StderrLines, "formatter": "json"}},
        "loggers": {
            "uvicorn": {"handlers": [], "propagate": True},
            "uvicorn.error": {"handlers": [], "propagate": True},
            "uvicorn.access": {"handlers": [], "propagate": False},
        },
        "root": {"handlers": ["stderr"], "level": numeric},
    }


def access_line(exchange: Exchange, finished: float) -> str:
    """The access-log line of one request, written out by hand: the fields are fixed and
    mostly numbers or checked names, so only the free-text ones (method, path, request
    id) go through the JSON string encoder; `json.dumps` of a dict costs three times as
    much, on the same core as the proxy. `path` has no query string: queries may carry
    tokens. `authz` is there when an authorizer decided (never in allow-all mode)."""
    authz = "" if exchange.authz is None else f', "authz": "{exchange.authz}"'
    return (
        f'{{"time": "{_timestamp(finished)}", "method": {_string(exchange.method)}, '
        f'"path": {_string(exchange.path)}, "status": {exchange.status or 500}, '
        f'"duration_ms": {round(exchange.duration * 1000, 3)}, "route": "{exchange.route}", '
        f'"pod": {_string(exchange.pod)}, "namespace": {_string(exchange.namespace)}, '
        f'"attempts": {exchange.attempts}, "bytes_in": {exchange.bytes_in}, '
        f'"bytes_out": {exchange.bytes_out}, "client": {_string(exchange.client)}, '
        f'"request_id": {_string(exchange.request_id)}{authz}}}'
    )


def write_lines(stream: TextIO, lines: list[str]) -> None:
    """`lines` (ASCII: JSON escapes the rest) as writes of whole lines, each at most
    `PIPE_BUF` bytes unless one line is longer."""
    batch: list[str] = []
    size = 0
    for line in lines:
        if batch and size + len(line) + 1 > PIPE_BUF:
            stream.write("\n".join(batch) + "\n")
            stream.flush()
            batch, size = [], 0
        batch.append(line)
        size += len(line) + 1
    if batch:
        stream.write("\n".join(batch) + "\n")
        stream.flush()


def _string(value: str | None) -> str:
    return "null" if value is None else encode_basestring_ascii(value)


class AccessLog(NullObserver):
    """One JSON line per proxied request on `stream`, written by a thread of its own.

    The event loop only appends to a deque (no lock, no wake-up); the writer wakes every
    `FLUSH_SECONDS` and writes what has gathered in one go. Waking it per request would
    hand the GIL back and forth on every request, which costs far more than the lines.
    """

    def __init__(self, stream: TextIO | None = None, capacity: int = QUEUE_LINES) -> None:
        self._stream = stream if stream is not None else sys.stdout
        self._capacity = capacity
        self._pending: collections.deque[tuple[Exchange, float]] = collections.deque()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.dropped = 0

    def request_finished(self, exchange: Exchange) -> None:
        if len(self._pending) < self._capacity:
            self._pending.append((exchange, time.time()))
        else:
            self.dropped += 1

    def start(self) -> None:
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="access-log", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Write what is pending, then end the thread (blocking: call off the loop)."""
        if self._thread is not None:
            self._stopping.set()
            self._thread.join(STOP_SECONDS)  # a stdout that never drains must not hang exit
            self._thread = None

    def _run(self) -> None:
        reported = 0
        while not self._stopping.wait(FLUSH_SECONDS):
            self._flush()
            if self.dropped > reported:
                reported = self.dropped
                log.warning("access log dropped %d lines so far: stdout is not keeping up",
                            reported)
        self._flush()

    def _flush(self) -> None:
        """Format and write what is pending, a batch at a time: the GIL goes back to the
        event loop after each batch. Formatting all at once held it for a whole switch
        interval (5 ms) while the loop waited, a few times a second: the router's p99 at
        c=16 with the access log on was 5.5-6.5 ms, and 1.2 ms without it (#13)."""
        pending = self._pending
        if not pending:
            return
        while pending:
            write_lines(self._stream, [access_line(*pending.popleft())
                                       for _ in range(min(len(pending), FLUSH_BATCH))])
            time.sleep(0)  # releases the GIL; the loop, if waiting for it, takes it


class Throttle(Generic[Key]):
    """At most one log line per key (a pod, say) every `interval` seconds, so a pod that
    fails a thousand requests a second writes one line, not a thousand; the lines held
    back are counted, for the next line to say how many there were."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._last: dict[Key, tuple[float, int]] = {}  # when the last line went, held since

    def allow(self, key: Key, now: float) -> int | None:
        """None to stay quiet; else how many lines for `key` were held back before this."""
        last = self._last.get(key)
        if last is None or now - last[0] >= self._interval:
            self._last[key] = (now, 0)
            return 0 if last is None else last[1]
        self._last[key] = (last[0], last[1] + 1)
        return None

    def forget(self, keep: Container[Key]) -> None:
        """Drop the keys not in `keep` (pods that left the list)."""
        for key in [key for key in self._last if key not in keep]:
            del self._last[key]


REPEAT_INTERVAL = 10.0


class Repeated:
    """A warning any client can cause at will, a line per request (a malformed request,
    an address the policy refuses): written at most once every `interval` seconds, the
    next line saying how many were held back. A flood of them is then a line every ten
    seconds, not a line each, and cannot crowd the warnings an operator acts on out of
    stderr's queue; each request is still in the access log."""

    def __init__(self, logger: logging.Logger, message: str,
                 interval: float = REPEAT_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._logger = logger
        self._message = message
        self._clock = clock
        self._throttle: Throttle[None] = Throttle(interval)

    def warning(self, *args: object) -> None:
        held = self._throttle.allow(None, self._clock())
        if held is None:
            return
        if held:
            self._logger.warning(self._message + "; %d more since the last line", *args, held)
        else:
            self._logger.warning(self._message, *args)
