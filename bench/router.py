"""The router under test, as its own process (`python -m router`, the command's module
form) over a static pool, on a port picked for it."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from collections.abc import Sequence
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from bench.nginx import Pod
from bench.procs import ServerChild, fetch, free_port


def router_command(port: int, pods: Sequence[Pod], observability: bool,
                   metrics_port: int = 0) -> list[str]:
    """`python -m router` on 127.0.0.1:`port` over `pods`: with `observability`, the
    operator defaults (`/metrics` on `metrics_port`, an access line per request), else
    the bare proxy."""
    return [
        # -P: `-m` would put the working directory (this checkout, when run from it)
        # ahead of PYTHONPATH, and another source tree would silently measure this router.
        sys.executable, "-P", "-m", "router",
        "--host", "127.0.0.1", "--port", str(port),
        "--pods", ",".join(f"{p.name}={p.host}:{p.port}" for p in pods),
        "--metrics-port", str(metrics_port if observability else 0),
        "--log-level", "info" if observability else "warning",
        "--access-log" if observability else "--no-access-log",
    ]


class RouterProcess(ServerChild):
    """`observability=True` is the operator default: `/metrics` served and one access-log
    line per request (to /dev/null); off, both are disabled to show the bare proxy. `extra`
    are more router flags (bench/probes.py: `--limit-concurrency`; `--workers`). `source`
    is another source tree whose `router` package runs instead of this one (on the same
    interpreter and installed packages): an earlier commit, measured in the same run."""

    def __init__(self, name: str, workdir: Path, pods: Sequence[Pod], observability: bool,
                 extra: Sequence[str] = (), source: Path | None = None):
        port = free_port()
        self.metrics_port = free_port() if observability else 0
        argv = [*router_command(port, pods, observability, self.metrics_port), *extra]
        env = None
        if source is not None:
            env = {**os.environ, "PYTHONPATH": str(source)}  # ahead of the installed package
        super().__init__(name, argv, workdir / f"{name}.log", port, "/ready", env)

    def metrics_served(self) -> bool:
        """Whether `/metrics` answers with the router's counters (it is built in parallel
        with this bench; without it the observability cost is only the access log's)."""
        if not self.metrics_port:
            return False
        try:
            status, body = fetch(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2.0)
        except OSError:
            return False
        return status == 200 and b"warmpool_router_requests_total" in body

    def attempts(self) -> tuple[float, float]:
        """(pod attempts, requests) the router has counted so far, from `/metrics`."""
        totals = self._totals("warmpool_router_upstream_attempts", "warmpool_router_requests")
        return totals["warmpool_router_upstream_attempts"], totals["warmpool_router_requests"]

    def collections(self) -> tuple[float, float]:
        """(young garbage collections, requests) so far, from `/metrics`."""
        totals = self._totals("warmpool_router_gc_collections", "warmpool_router_requests",
                              generation="0")
        return totals["warmpool_router_gc_collections"], totals["warmpool_router_requests"]

    def _totals(self, *families: str, **labels: str) -> dict[str, float]:
        """Each family's `_total` samples added up (those with `labels`, where they have
        those label names)."""
        _, body = fetch(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5.0)
        totals = dict.fromkeys(families, 0.0)
        for family in text_string_to_metric_families(body.decode()):
            if family.name in totals:
                totals[family.name] += sum(
                    sample.value for sample in family.samples
                    if sample.name.endswith("_total")
                    and all(sample.labels.get(k, v) == v for k, v in labels.items()))
        return totals


def source_tree(compare: str, workdir: Path) -> Path:
    """A source tree as given, or a commit's `router/` extracted from git into `workdir`:
    what `--compare` runs beside this checkout."""
    if Path(compare).is_dir():
        return Path(compare).resolve()
    tree = workdir / f"source-{compare}"
    archive = subprocess.run(["git", "archive", "--format=tar", compare, "router"],
                             capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(tree, filter="data")
    return tree
