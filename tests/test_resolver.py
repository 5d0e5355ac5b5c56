"""Name lookups (router/resolver.py): shared per name, failures cached, at most
`MAX_LOOKUPS` under way, and a request that leaves starts none. The lookups here block
in executor threads until the test releases them, as the system resolver holds one of
libuv's threads against a DNS server that has stopped answering."""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import threading
from collections.abc import Iterator

import httpx
import pytest

from router.resolver import FAILURE_SECONDS, MAX_LOOKUPS, LookupFailed, Resolver
from tests.clock import ManualClock
from tests.conftest import StartPods, StartRouter, eventually, static_config

WAIT = 10.0
"""The longest a blocked lookup waits for the test to release it."""


class HungDns:
    """Names to addresses, every lookup held in a thread of its own until `release`; the
    names asked for, in order, in `asked`."""

    def __init__(self, names: dict[str, str]) -> None:
        self.names = names
        self.asked: list[str] = []
        self.ended = 0
        self._released = threading.Event()
        self._threads = concurrent.futures.ThreadPoolExecutor(max_workers=64)

    async def lookup(self, host: str) -> str:
        self.asked.append(host)
        await asyncio.get_running_loop().run_in_executor(
            self._threads, self._released.wait, WAIT)
        self.ended += 1  # the caller's slot is released in this same step
        if host not in self.names:
            raise OSError(socket.EAI_NONAME, "Name or service not known")
        return self.names[host]

    def release(self) -> None:
        self._released.set()

    def close(self) -> None:
        self.release()
        self._threads.shutdown(wait=True)


@pytest.fixture
def dns() -> Iterator[HungDns]:
    hung = HungDns({"sb.ns.svc": "10.0.0.1"})
    yield hung
    hung.close()


async def _settle() -> None:
    """Let every task that can run do so (a bounded number of loop turns)."""
    for _ in range(10):
        await asyncio.sleep(0)


def test_requests_for_one_name_share_one_lookup(dns: HungDns) -> None:
    async def main() -> list[str]:
        resolve = Resolver(dns.lookup)
        waiting = [asyncio.ensure_future(resolve("sb.ns.svc")) for _ in range(20)]
        await _settle()
        dns.release()
        return await asyncio.gather(*waiting)

    assert asyncio.run(main()) == ["10.0.0.1"] * 20
    assert dns.asked == ["sb.ns.svc"]


def test_a_failure_is_kept_for_failure_seconds_then_looked_up_again(dns: HungDns) -> None:
    dns.release()
    clock = ManualClock()

    async def main() -> None:
        resolve = Resolver(dns.lookup, clock)
        for _ in range(3):
            with pytest.raises(LookupFailed, match="not known"):
                await resolve("gone.ns.svc")
        assert dns.asked == ["gone.ns.svc"]
        dns.names["gone.ns.svc"] = "10.0.0.2"  # the name appears
        clock.advance(FAILURE_SECONDS + 0.01)
        assert await resolve("gone.ns.svc") == "10.0.0.2"
        assert await resolve("gone.ns.svc") == "10.0.0.2"

    asyncio.run(main())
    assert dns.asked == ["gone.ns.svc", "gone.ns.svc"]


def test_at_most_max_lookups_are_under_way_and_a_request_that_left_starts_none(
    dns: HungDns,
) -> None:
    names = [f"sb-{i}.ns.svc" for i in range(MAX_LOOKUPS + 3)]

    async def main() -> None:
        resolve = Resolver(dns.lookup)
        first = [asyncio.ensure_future(resolve(name)) for name in names[:MAX_LOOKUPS]]
        late = [asyncio.ensure_future(resolve(name)) for name in names[MAX_LOOKUPS:]]
        await _settle()
        assert dns.asked == names[:MAX_LOOKUPS]  # the others wait for a slot
        for request in late[1:]:  # their connect timeouts end: they leave
            request.cancel()
        dns.release()
        for request in first:
            with pytest.raises(LookupFailed):
                await request
        with pytest.raises(LookupFailed):
            await late[0]
        await _settle()

    asyncio.run(main())
    assert dns.asked == names[:MAX_LOOKUPS + 1]  # none for the requests that left


def test_a_request_that_leaves_does_not_end_the_lookup_others_wait_on(dns: HungDns) -> None:
    async def main() -> str:
        resolve = Resolver(dns.lookup)
        leaving = asyncio.ensure_future(resolve("sb.ns.svc"))
        staying = asyncio.ensure_future(resolve("sb.ns.svc"))
        await _settle()
        leaving.cancel()
        await _settle()
        dns.release()
        return await staying

    assert asyncio.run(main()) == "10.0.0.1"
    assert dns.asked == ["sb.ns.svc"]


async def _pinned(url: str, sandboxes: list[str]) -> list[int]:
    """The statuses of pinned requests for `sandboxes`, sent at once."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        answers = await asyncio.gather(*(
            client.get("/", headers={"X-Sandbox-ID": sandbox, "X-Sandbox-Namespace": "ns"})
            for sandbox in sandboxes))
    return [answer.status_code for answer in answers]


def test_a_dns_outage_leaves_no_backlog_of_lookups(
    start_pods: StartPods, start_router: StartRouter, dns: HungDns
) -> None:
    """Pinned requests for names nobody indexed, while DNS hangs: each gets its 502 at
    its connect timeout, the pool is served meanwhile, and once DNS answers again a new
    name is looked up at once: the requests that left queued no lookups behind it."""
    pods = start_pods(1)
    dns.names["sb-new.ns.svc.cluster.test"] = pods[0].ip  # a known pod: no --pod-cidr needed
    config = static_config(pods, cluster_domain="cluster.test", connect_timeout=0.5,
                           pod_port=pods[0].port,
                           allow_loopback_pod_ip=True)  # the answer is a loopback pod
    client = start_router(config, lookup=dns.lookup)
    sandboxes = [f"sb-{i}" for i in range(3 * MAX_LOOKUPS)]
    assert asyncio.run(_pinned(str(client.base_url), sandboxes)) == [502] * len(sandboxes)
    assert client.get("/").status_code == 200  # the pool takes no lookup
    assert len(dns.asked) == MAX_LOOKUPS
    dns.release()
    eventually(lambda: dns.ended == MAX_LOOKUPS)  # their slots are free
    response = client.get("/", headers={"X-Sandbox-ID": "sb-new", "X-Sandbox-Namespace": "ns"})
    assert response.status_code == 200
    assert dns.asked[MAX_LOOKUPS:] == ["sb-new.ns.svc.cluster.test"]
