"""A py-spy profile of the router under load (`--profile PATH`), taken in an extra cell
after the table's, so sampling never slows a cell that is reported. py-spy is not a
project dependency: install it into the venv to use this."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from bench import wrk
from bench.procs import Child


def record(pid: int, url: str, connections: int, seconds: int, out: Path) -> None:
    """`.txt` writes collapsed stacks (one `frame;frame;... count` a line, for scripts),
    anything else a flame graph SVG."""
    # The venv's own bin first: `.venv/bin/python -m bench.run` does not put it on PATH.
    found = shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    if found is None:
        raise RuntimeError("--profile needs py-spy (.venv/bin/pip install py-spy)")
    fmt = "raw" if out.suffix == ".txt" else "flamegraph"
    argv = [found, "record", "--pid", str(pid), "--duration", str(seconds),
            "--format", fmt, "--output", str(out)]
    with Child("py-spy", argv, out.with_suffix(".log")) as spy:
        wrk.run(url, connections, seconds)
        spy.process.wait(seconds + 30)
