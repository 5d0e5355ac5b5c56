"""Child processes, loopback ports and plain HTTP reads.

Every process the bench starts is stopped by its own PID, whatever happens; every port is
one the kernel just handed out, so two runs (or a test suite) never collide.
"""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Self

# No proxy from the environment: every request the bench makes stays on loopback.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port(hosts: Sequence[str] = ("127.0.0.1",)) -> int:
    """A port free on every address in `hosts`: the pods share one port across loopback IPs."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind((hosts[0], 0))
            port: int = probe.getsockname()[1]
        if all(_bindable(host, port) for host in hosts[1:]):
            return port
    raise RuntimeError(f"no port free on all of {', '.join(hosts)}")


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def fetch(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """Status and body of one GET; an HTTP error status is an answer, not an exception."""
    try:
        with _OPENER.open(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class Child:
    """A process the bench started: SIGTERM then SIGKILL by its PID when stopped, and its
    stderr kept in a file so a failed start can say why; its stdout is dropped unless
    `stdout` names a file to keep it in."""

    def __init__(self, name: str, argv: Sequence[str], log: Path,
                 env: Mapping[str, str] | None = None, stdout: Path | None = None) -> None:
        self.name = name
        self.log = log
        with ExitStack() as files:
            stderr = files.enter_context(log.open("wb"))
            out = subprocess.DEVNULL if stdout is None else files.enter_context(stdout.open("wb"))
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=stderr, env=env,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, url: str, want: int = 200, timeout: float = 20.0) -> None:
        """Poll `url` until it answers `want`; fail early, with the log, if the child exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start:\n{self.log.read_text()}")
            try:
                if fetch(url, timeout=1.0)[0] == want:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready after {timeout} s:\n{self.log.read_text()}")

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ServerChild(Child):
    """A child serving HTTP on `port` of 127.0.0.1: started, then awaited until
    `ready_path` answers 200; stopped again if it never does."""

    def __init__(self, name: str, argv: Sequence[str], log: Path, port: int,
                 ready_path: str, env: Mapping[str, str] | None = None,
                 stdout: Path | None = None) -> None:
        self.port = port
        super().__init__(name, argv, log, env, stdout)
        try:
            self.wait_ready(self.url + ready_path)
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"
