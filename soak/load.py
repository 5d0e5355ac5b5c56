"""The soak's client: a seeded plan of requests of every kind, sent at a fixed concurrency
with aiohttp, each answer checked byte for byte and classified.

Every request carries its own `X-Request-ID`, which the router passes on and the pods log:
the key the verdict joins both sides by. aiohttp's own resend of an idempotent request on
a reused connection is off, so each id is sent to the router exactly once.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp

KiB, MiB = 1024, 1024 * 1024

# name: (weight, method, smallest, largest, chunked upload, download)
KINDS: dict[str, tuple[int, str, int, int, bool, bool]] = {
    "get": (30, "GET", 0, 2 * KiB, False, False),
    "get_medium": (6, "GET", 64 * KiB, 512 * KiB, False, True),
    "get_large": (2, "GET", 1 * MiB, 5 * MiB, False, True),
    "post": (22, "POST", 100, 16 * KiB, False, False),
    "post_1mib": (4, "POST", 1 * MiB, 1 * MiB, False, False),
    "post_large": (2, "POST", 2 * MiB, 5 * MiB, False, False),
    "put": (16, "PUT", 1 * KiB, 64 * KiB, False, False),
    "chunked": (16, "POST", 1 * KiB, 256 * KiB, True, False),
    "chunked_large": (2, "POST", 1 * MiB, 3 * MiB, True, False),
}
PIECE = 16 * KiB


@dataclass(frozen=True)
class Planned:
    request_id: str
    kind: str
    method: str
    size: int
    offset: int  # where its upload starts in the shared block
    chunked: bool


@dataclass(frozen=True)
class Result:
    """What the client saw. `outcome`: `ok` (200, body verified), `wrong` (200, body not
    what was sent or served), `answer` (another status; `detail` from the JSON body),
    `cut` (the head came, the body ended short), `refused` (no answer head: the router's
    connection failed), `hung` (no end within the timeout)."""

    request_id: str
    kind: str
    method: str
    started: float
    ended: float
    outcome: str
    status: int
    pod: str
    detail: str


def plan(count: int, seed: int, max_size: int, block_size: int) -> list[Planned]:
    rng = random.Random(seed)
    names = list(KINDS)
    weights = [KINDS[name][0] for name in names]
    planned = []
    for index in range(count):
        kind = rng.choices(names, weights)[0]
        _, method, low, high, chunked, _ = KINDS[kind]
        size = rng.randint(min(low, max_size), min(high, max_size))
        offset = rng.randrange(0, block_size - size) if method != "GET" else 0
        planned.append(Planned(f"soak-{seed}-{index}", kind, method, size, offset, chunked))
    return planned


async def run(url: str, planned: list[Planned], concurrency: int, data: bytes,
              hung_after: float = 120.0) -> list[Result]:
    """Sends every planned request, `concurrency` at a time; one `Result` each."""
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    results: list[Result] = []
    queue = iter(planned)
    async with aiohttp.ClientSession(url, connector=connector, auto_decompress=False,
                                     timeout=aiohttp.ClientTimeout(total=hung_after)) as session:
        session._retry_connection = False  # one send per id: see the module's docstring

        async def worker() -> None:
            for request in queue:
                results.append(await send(session, request, data))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


async def send(session: aiohttp.ClientSession, request: Planned, data: bytes) -> Result:
    started = time.monotonic()
    body = data[request.offset:request.offset + request.size]
    expected = hashlib.sha256(body).hexdigest() if request.method != "GET" else ""
    payload: bytes | AsyncIterator[bytes] | None = None
    if request.method != "GET":
        payload = pieces(body) if request.chunked else body
    path = f"/get?size={request.size}" if request.method == "GET" else f"/{request.kind}"
    status, pod, detail = 0, "", ""

    def result(outcome: str) -> Result:
        return Result(request.request_id, request.kind, request.method, started,
                      time.monotonic(), outcome, status, pod, detail)

    try:
        async with session.request(request.method, path, data=payload,
                                   headers={"X-Request-ID": request.request_id}) as answer:
            status, pod = answer.status, answer.headers.get("x-sandbox-id", "")
            try:
                if status == 200 and request.method == "GET":
                    same = await matches(answer, data[:request.size])
                    return result("ok" if same else "wrong")
                text = await answer.read()
            except aiohttp.ClientPayloadError as exc:
                detail = str(exc)
                return result("cut")
            if status != 200:
                detail = str(_json(text).get("detail", ""))
                return result("answer")
            echo = _json(text)
            same = echo.get("sha256") == expected and echo.get("bytes") == request.size
            return result("ok" if same else "wrong")
    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
        detail = f"{type(exc).__name__}: {exc}"
        return result("cut" if status else "refused")
    except TimeoutError:
        return result("hung")


async def pieces(body: bytes) -> AsyncIterator[bytes]:
    """A chunked upload: pieces, with a loop turn between them."""
    for start in range(0, len(body), PIECE):
        yield body[start:start + PIECE]
        await asyncio.sleep(0)


async def matches(answer: aiohttp.ClientResponse, expected: bytes) -> bool:
    position, same = 0, True
    async for chunk in answer.content.iter_any():
        same = same and expected[position:position + len(chunk)] == chunk
        position += len(chunk)
    return same and position == len(expected)


def _json(text: bytes) -> dict[str, object]:
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
