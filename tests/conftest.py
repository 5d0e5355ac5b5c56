"""Fixtures: fake sandbox pods on 127.0.0.x and the router as a real uvicorn server."""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from router.app import Router
from router.balancer import FirstIndex
from router.config import Config, StaticPod
from router.metrics import Metrics
from router.observe import Observer
from router.pods import PodSource
from router.resolver import Lookup, system_lookup
from router.server import ServerThread, bind, server_config
from tests.clock import ManualClock
from tests.fake_kube import FakeKube
from tests.kube_router import ready
from tests.rawpod import Behaviour, RawPod
from tests.sandbox import Pod

StartPods = Callable[..., list[Pod]]


def names_lookup(names: dict[str, str]) -> Lookup:
    """Name lookups from a dict, so cluster DNS names can point at loopback pods with no
    query leaving the machine; unknown names fail as NXDOMAIN would."""

    async def resolve(host: str) -> str:
        if host not in names:
            raise OSError(socket.EAI_NONAME, f"unknown host {host}")
        return names[host]

    return resolve


StartRouter = Callable[..., httpx.Client]


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    """The fake Kubernetes API (`tests/fake_kube.py`), served on loopback for one test."""
    fake = FakeKube().start()
    yield fake
    fake.stop()


@pytest.fixture
def servers() -> Iterator[list[ServerThread]]:
    """Every server a test starts; all are told to stop at once, then awaited."""
    running: list[ServerThread] = []
    yield running
    for server in running:
        server.signal_stop()
    for server in running:
        server.join()


@pytest.fixture
def start_pods(servers: list[ServerThread]) -> StartPods:
    """`start_pods(3)` runs pods pod-0.. on 127.0.0.2.., all on one shared port (as pods in a
    cluster share the sandbox port), and stops them after the test."""
    running: list[Pod] = []

    def start(count: int, first_ip: int = 2) -> list[Pod]:
        port = 0
        for index in range(count):
            pod = Pod(f"pod-{len(running)}", f"127.0.0.{first_ip + index}", port)
            port = pod.port
            running.append(pod)
            servers.append(pod.thread)
        return running[-count:]

    return start


StartRawPods = Callable[..., list[RawPod]]


@pytest.fixture
def start_raw_pods() -> Iterator[StartRawPods]:
    """`start_raw_pods(behaviour, ...)` runs one raw pod per behaviour on 127.0.0.2..,
    sharing one port, and stops them after the test."""
    running: list[RawPod] = []

    def start(*behaviours: Behaviour) -> list[RawPod]:
        port = 0
        for index, behaviour in enumerate(behaviours):
            pod = RawPod(f"raw-{index}", f"127.0.0.{2 + index}", behaviour, port)
            port = pod.port
            running.append(pod)
        return running[-len(behaviours):]

    yield start
    for pod in running:
        pod.stop()


def eventually(check: Callable[[], object], timeout: float = 10.0) -> None:
    """Polls a condition that no event signals (a router's state, a subprocess's), up to
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int | None) -> Samples:
    """Every sample of `/metrics` on `port`, by name and labels."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.fixture
def metrics() -> Iterator[Metrics]:
    """Metrics served on a free loopback port, for a router made with `metrics=`."""
    served = Metrics(proxy_timeout=30)
    served.serve(bind("127.0.0.1"))
    yield served
    served.close()


def static_config(pods: list[Pod] | list[RawPod], **options: Any) -> Config:
    """A router config over `pods` as a static pool; no metrics port unless asked for."""
    options.setdefault("metrics_port", 0)
    options.setdefault("log_level", "warning")
    static = tuple(StaticPod(p.name, p.ip, p.port) for p in pods)
    return dataclasses.replace(Config(port=0, pods=static), **options)


def free_port() -> int:
    """A port number free on 127.0.0.1 now, for a router process that binds it itself."""
    probe = bind("127.0.0.1")
    port: int = probe.getsockname()[1]
    probe.close()
    return port


def first_pod(size: int) -> int:
    """Where the round robin of a router under test starts: the first pod, as if it were
    the only router (a real one starts at random, router/balancer.py)."""
    return 0


@pytest.fixture
def start_router(servers: list[ServerThread]) -> Iterator[StartRouter]:
    """`start_router(config)` serves the router in a thread on 127.0.0.1 and returns an
    httpx client for it; the server and the client are closed after the test.
    `loop="asyncio"` serves on the standard event loop, whose connects the audit hook of
    `tests/connects.py` sees (uvloop, the default, connects in C). The pods' cooldowns run
    on `clock`, by default one that stands still (see tests/clock.py); the round robin
    starts at `first`, by default the first pod. Names are looked up in `names`, or by
    `lookup`, else by the system."""
    clients: list[httpx.Client] = []

    def start(
        config: Config,
        source: PodSource | None = None,
        observer: Observer | None = None,
        names: dict[str, str] | None = None,
        metrics: Metrics | None = None,
        loop: str = "auto",
        clock: ManualClock | None = None,
        first: FirstIndex = first_pod,
        lookup: Lookup | None = None,
    ) -> httpx.Client:
        if lookup is None:
            lookup = names_lookup(names) if names is not None else system_lookup
        app = Router(config, source=source, observer=observer, lookup=lookup,
                     metrics=metrics, clock=clock or ManualClock(), first=first)
        serving = server_config(config, app)
        serving.loop = loop
        thread = ServerThread(serving, bind("127.0.0.1")).start()
        client = httpx.Client(base_url=thread.url, timeout=30)
        client.app = app  # type: ignore[attr-defined]
        clients.append(client)
        servers.append(thread)
        return client

    yield start
    for client in clients:
        client.close()


@pytest.fixture
def kube_router(kube: FakeKube, tmp_path: Path, start_router: StartRouter) -> Callable[..., Any]:
    """`kube_router(pods, **options)` starts a router whose pods come from the fake API,
    and waits until it is ready (unless `wait=False`)."""

    def start(pods: list[Pod], observer: Any = None, metrics: Metrics | None = None,
              wait: bool = True, **options: Any) -> httpx.Client:
        options.setdefault("cache_ttl", 1.0)
        # The fake API lists pods on 127.0.0.x: listed pods go through the address policy.
        options.setdefault("allow_loopback_pod_ip", True)
        config = dataclasses.replace(
            Config(port=0, metrics_port=0, log_level="warning"),
            kubeconfig=str(kube.write_kubeconfig(tmp_path / "kubeconfig")),
            pod_port=pods[0].port,
            **options,
        )
        client = start_router(config, observer=observer, names={}, metrics=metrics)
        if wait:
            eventually(lambda: ready(client))
        return client

    return start
