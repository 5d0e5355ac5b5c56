"""Name lookups (router/resolver.py): shared per name, failures cached, at most
`BOUNDS.slots` under way for new names (one more for names that resolved before), and a
request that leaves starts none. The lookups here block
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

from router.resolver import ANSWER_SECONDS, BOUNDS, LookupFailed, Resolver
from tests.clock import ManualClock
from tests.conftest import StartPods, StartRouter, eventually, static_config

WAIT = 10.0
"""The longest a blocked lookup waits for the test to release it."""
SLOTS = BOUNDS.slots


class HungDns:
    """Names to addresses, every lookup (but of the `fast` names) held in a thread of its
    own until `release`; the names asked for, in order, in `asked`."""

    def __init__(self, names: dict[str, str]) -> None:
        self.names = names
        self.asked: list[str] = []
        self.fast: set[str] = set()  # names answered at once, hung or not
        self.ended = 0
        self._released = threading.Event()
        self._threads = concurrent.futures.ThreadPoolExecutor(max_workers=64)

    async def lookup(self, host: str) -> str:
        self.asked.append(host)
        if host not in self.fast:
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
        clock.advance(BOUNDS.failure_ttl + 0.01)
        assert await resolve("gone.ns.svc") == "10.0.0.2"
        assert await resolve("gone.ns.svc") == "10.0.0.2"

    asyncio.run(main())
    assert dns.asked == ["gone.ns.svc", "gone.ns.svc"]


def test_at_most_max_lookups_are_under_way_and_a_request_that_left_starts_none(
    dns: HungDns,
) -> None:
    names = [f"sb-{i}.ns.svc" for i in range(SLOTS + 3)]

    async def main() -> None:
        resolve = Resolver(dns.lookup)
        first = [asyncio.ensure_future(resolve(name)) for name in names[:SLOTS]]
        late = [asyncio.ensure_future(resolve(name)) for name in names[SLOTS:]]
        await _settle()
        assert dns.asked == names[:SLOTS]  # the others wait for a slot
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
    assert dns.asked == names[:SLOTS + 1]  # none for the requests that left


def test_random_names_cannot_keep_a_name_that_resolved_from_being_looked_up_again(
    dns: HungDns
) -> None:
    """A flood of new names takes every slot and waiting place of new names; a sandbox's
    name that resolved before is looked up again, as its answer expires, in a slot of
    its own. A new name meanwhile fails at once (the flood's doing)."""
    clock = ManualClock()
    dns.fast.add("sb.ns.svc")

    async def main() -> None:
        resolve = Resolver(dns.lookup, clock)
        assert await resolve("sb.ns.svc") == "10.0.0.1"
        flood = [asyncio.ensure_future(resolve(f"random-{i}.ns.svc"))
                 for i in range(SLOTS + BOUNDS.max_waiting)]
        await _settle()
        clock.advance(ANSWER_SECONDS + 0.01)  # its answer expires
        assert await resolve("sb.ns.svc") == "10.0.0.1"
        with pytest.raises(LookupFailed, match="too many requests wait"):
            await resolve("new.ns.svc")
        for request in flood:
            request.cancel()
        dns.release()
        await asyncio.gather(*flood, return_exceptions=True)

    asyncio.run(main())
    assert dns.asked.count("sb.ns.svc") == 2


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
    sandboxes = [f"sb-{i}" for i in range(3 * SLOTS)]
    assert asyncio.run(_pinned(str(client.base_url), sandboxes)) == [502] * len(sandboxes)
    assert client.get("/").status_code == 200  # the pool takes no lookup
    assert len(dns.asked) == SLOTS
    dns.release()
    eventually(lambda: dns.ended == SLOTS)  # their slots are free
    response = client.get("/", headers={"X-Sandbox-ID": "sb-new", "X-Sandbox-Namespace": "ns"})
    assert response.status_code == 200
    assert dns.asked[SLOTS:] == ["sb-new.ns.svc.cluster.test"]


def test_a_lookup_that_raises_a_cancellation_of_its_own_is_a_failure() -> None:
    """A thread pool shut down under a call cancels its future: that is the call's
    failure, kept and raised as one, not a cancellation of the requests waiting."""
    async def cancelled(host: str) -> str:
        raise asyncio.CancelledError

    async def main() -> None:
        resolve = Resolver(cancelled)
        for _ in range(2):
            with pytest.raises(LookupFailed, match="cancelled"):
                await resolve("sb.ns.svc")

    asyncio.run(main())


def test_after_close_no_lookup_starts_and_no_request_waits(dns: HungDns) -> None:
    async def main() -> None:
        resolve = Resolver(dns.lookup)
        under_way = asyncio.ensure_future(resolve("sb.ns.svc"))
        await _settle()
        resolve.close()  # at shutdown
        with pytest.raises(LookupFailed):
            await resolve("other.ns.svc")
        under_way.cancel()
        await asyncio.gather(under_way, return_exceptions=True)

    asyncio.run(main())
    assert dns.asked == ["sb.ns.svc"]
