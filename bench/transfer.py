"""64 MiB each way with curl: a client that is never the bottleneck and reports its own
rate. `Expect:` is turned off so curl never waits for a `100 Continue`."""

from __future__ import annotations

import subprocess
from pathlib import Path

from bench.usage import MIB

_FORMAT = "%{http_code} %{size_download} %{size_upload} %{speed_download} %{speed_upload}"


def _curl(args: list[str], timeout: float) -> tuple[int, int, int, float, float]:
    argv = ["curl", "--silent", "--show-error", "--noproxy", "*", "--output", "/dev/null",
            "--write-out", _FORMAT, *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"curl failed ({done.returncode}): {done.stderr.strip()}")
    code, down, up, speed_down, speed_up = done.stdout.split()
    return int(code), int(down), int(up), float(speed_down), float(speed_up)


def download(url: str, size: int, timeout: float = 120.0) -> float:
    """MiB/s of one GET of `size` bytes; anything short or not 200 is an error."""
    code, down, _, speed, _ = _curl([url], timeout)
    if code != 200 or down != size:
        raise RuntimeError(f"download {url}: status {code}, {down} of {size} bytes")
    return speed / MIB


def upload(url: str, path: Path, timeout: float = 120.0) -> float:
    """MiB/s of one POST of the file at `path`; counted only if the pod answers 200."""
    size = path.stat().st_size
    code, _, up, _, speed = _curl(
        ["--data-binary", f"@{path}", "-H", "Content-Type: application/octet-stream",
         "-H", "Expect:", url], timeout)
    if code != 200 or up != size:
        raise RuntimeError(f"upload {url}: status {code}, {up} of {size} bytes")
    return speed / MIB
