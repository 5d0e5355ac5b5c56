"""The router as a real subprocess (`python -m router`), for the command line itself."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence

_LISTENING = re.compile(r"running on http://[^:\s]+:(\d+)")


class RouterProcess:
    """Start `python -m router ARGS` on 127.0.0.1, port 0, no metrics, no drain grace
    (unless ARGS say otherwise), and learn its port from the start-up log line; every
    output line is kept in `lines` for the test to read. `preexec` runs in the child
    before the router starts (lowering a resource limit)."""

    def __init__(self, args: Sequence[str], env: Mapping[str, str] | None = None,
                 preexec: Callable[[], None] | None = None) -> None:
        command = [sys.executable, "-m", "router", "--host", "127.0.0.1", "--port", "0",
                   "--metrics-port", "0", "--drain-grace", "0", *args]
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # its own group: `--workers` children go down with it
            preexec_fn=preexec,
        )
        self.lines: list[str] = []
        self._reading = threading.Event()  # cleared: its output is left unread (`pause`)
        self._reading.set()
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            self.port = self._wait_for_port()
        except BaseException:
            self.kill()
            raise

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def pause(self) -> None:
        """Stop reading its output: once the pipe is full, its writes block."""
        self._reading.clear()

    def resume(self) -> None:
        self._reading.set()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._reading.wait()
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    def _wait_for_port(self, timeout: float = 20.0) -> int:
        while True:
            line = self._queue.get(timeout=timeout)
            if line is None:
                raise RuntimeError("router exited before listening:\n" + "".join(self.lines))
            match = _LISTENING.search(line)
            if match:
                return int(match.group(1))

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, then wait; returns the exit status once every line it wrote is in
        `lines` (the reader thread may still be behind when the process has exited)."""
        self.resume()
        if self.process.poll() is None:
            self.process.terminate()
        try:
            status = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            status = self.process.wait(timeout)
        self._reader.join(timeout)
        return status

    def kill(self) -> None:
        """SIGKILL to the router and every process it started (its process group)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def run_router(
    args: Sequence[str], env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the command to completion (for --help and bad options)."""
    return subprocess.run(
        [sys.executable, "-m", "router", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )
