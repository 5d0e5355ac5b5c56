"""How fast this machine's CPU is at the moment, recorded with every run: the same
commit's req/s and CPU per request move by 2-3 times from one (shared, virtual) machine
to the next, and a result file says nothing about which one it ran on without this. The
reading is a pure-Python loop, the kind of work the router's own time goes to; it is
taken before the first cell and after the last, so a machine that slowed down during the
run shows too."""

from __future__ import annotations

import timeit
from pathlib import Path

LOOP = "sum(range(1000))"


def loop_us() -> float:
    """The best of five timings of `LOOP`, in µs (about 8 on a fast desktop core)."""
    timer = timeit.Timer(LOOP)
    number, _ = timer.autorange()
    return min(timer.repeat(5, number)) / number * 1e6


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"
