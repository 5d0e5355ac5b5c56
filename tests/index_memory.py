"""What the sandbox index costs in memory: N sandbox pods listed from the fake API by the
real pod source, the memory still held by allocations made in `router/` once it has
synced (the `Pod` values, the watches' maps, the snapshot, the address policy's set),
measured with tracemalloc; next to it, what the parsed API objects of the same list take,
which is what a cache of objects would hold.

`python -m tests.index_memory [N]` prints the figures (docs/kubernetes.md quotes them).
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import router
from router.config import Config
from router.observe import NullObserver
from router.sandboxes import KubernetesPodSource
from router.targets import TargetPolicy
from tests.conftest import eventually
from tests.fake_kube import POOL_LABELS, FakeKube, sandbox_labels


@dataclass(frozen=True)
class Figures:
    indexed: int  # sandboxes the index holds once synced
    pooled: int  # of which in the pool
    index_bytes: int  # held by allocations made in router/
    objects_bytes: int  # the same pods as parsed API objects


def measure(kube: FakeKube, directory: Path, count: int, pooled: bool = False) -> Figures:
    """Adds `count` sandbox pods (warm-pool pods too if `pooled`) and measures."""
    for i in range(count):
        labels = sandbox_labels(f"sb-{i}") | (POOL_LABELS if pooled else {})
        kube.add_pod(f"sb-{i}", f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", labels=labels)
    config = Config(kubeconfig=str(kube.write_kubeconfig(directory / "kubeconfig")))
    only_router = [tracemalloc.Filter(True, str(Path(router.__file__).parent / "*"))]
    tracemalloc.start()
    try:
        source = KubernetesPodSource(config, NullObserver())
        asyncio.run(source.start())
        try:
            eventually(lambda: (snapshot := source.snapshot()) is not None
                       and len(snapshot.by_name) == count)
            policy = TargetPolicy(source, allow_loopback=False, pod_cidr=(),
                                  operator_chosen=False)
            policy.admits_hint("192.0.2.1")  # builds its set of known addresses
            held = tracemalloc.take_snapshot().filter_traces(only_router)
            index_bytes = sum(stat.size for stat in held.statistics("filename"))
            snapshot = source.snapshot()
            assert snapshot is not None
            indexed, in_pool = len(snapshot.by_name), len(snapshot.pods)
        finally:
            asyncio.run(source.stop())
        text = json.dumps(kube.list_pods("default", {"labelSelector": ""}))
        before = tracemalloc.get_traced_memory()[0]
        objects = json.loads(text)
        objects_bytes = tracemalloc.get_traced_memory()[0] - before
        del objects
    finally:
        tracemalloc.stop()
    return Figures(indexed, in_pool, index_bytes, objects_bytes)


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    for pooled in (False, True):
        kube = FakeKube().start()
        try:
            with tempfile.TemporaryDirectory() as directory:
                figures = measure(kube, Path(directory), count, pooled)
        finally:
            kube.stop()
        print(f"{figures.indexed} sandboxes ({figures.pooled} of them in the pool): "
              f"index {figures.index_bytes / 1024:.0f} KiB "
              f"({figures.index_bytes / figures.indexed:.0f} B each); "
              f"as parsed API objects {figures.objects_bytes / 1024:.0f} KiB "
              f"({figures.objects_bytes / figures.indexed:.0f} B each)")


if __name__ == "__main__":
    main()
