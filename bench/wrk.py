"""wrk runs and their numbers. A Lua `done` hook prints wrk's own summary as JSON, so
nothing depends on the layout of its human-readable report."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

_SCRIPT = Path(__file__).with_name("summary.lua")
_MARK = "WRK_JSON "


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    socket_errors: int  # connect, read, write and timeout errors
    non_2xx: int  # wrk counts every status >= 400 here

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


class Load:
    """`with Load(url, c, seconds) as load:` runs wrk in the background, so the caller can
    look at the servers while it runs; `load.wait()` returns wrk's numbers. wrk is killed
    if the block is left early."""

    def __init__(self, url: str, connections: int, seconds: int, threads: int = 2) -> None:
        threads = max(1, min(threads, connections))
        argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency",
                "-s", str(_SCRIPT), url]
        self.seconds = seconds
        self._process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True)

    def wait(self) -> WrkResult:
        out, err = self._process.communicate(timeout=self.seconds + 60)
        if self._process.returncode != 0:
            raise RuntimeError(f"wrk failed ({self._process.returncode}): {err or out}")
        return parse(out)

    def __enter__(self) -> Load:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._process.poll() is None:
            self._process.kill()
        self._process.communicate()  # reaps it and closes its pipes


def run(url: str, connections: int, seconds: int, threads: int = 2) -> WrkResult:
    with Load(url, connections, seconds, threads) as load:
        return load.wait()


def parse(output: str) -> WrkResult:
    for line in output.splitlines():
        if line.startswith(_MARK):
            s = json.loads(line[len(_MARK):])
            return WrkResult(
                requests=int(s["requests"]),
                seconds=s["duration_us"] / 1e6,
                p50_ms=s["p50_us"] / 1e3,
                p99_ms=s["p99_us"] / 1e3,
                socket_errors=int(s["connect"] + s["read"] + s["write"] + s["timeout"]),
                non_2xx=int(s["status"]),
            )
    raise RuntimeError(f"no summary in wrk output:\n{output}")
