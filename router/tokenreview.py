"""`--authz-mode tokenreview`: the bearer token is whatever the cluster's API server accepts
(a ServiceAccount token, an OIDC token ...), asked with an `authentication.k8s.io/v1`
TokenReview.

The official client is synchronous: a review runs in a small pool of threads of its own, so
neither the event loop nor the default executor (DNS lookups use it) waits on the API.
Answers are cached by the token's SHA-256, never the token, for `--authz-tokenreview-ttl`;
a failed call (the API down, a timeout) for `FAILURE_TTL` only, answered 503, so an outage
is neither a stampede on the API nor a denial that outlives it. One review per token at a
time: concurrent requests with the same token wait for the one in flight.

Like the Go router's tokenreview mode, an authenticated caller may reach any sandbox: the
API server says who the caller is, not which sandbox is theirs.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from cachetools import TTLCache
from kubernetes import client as k8s

from router.authz import NO_CREDENTIAL, Target, unauthenticated
from router.config import Config
from router.errors import ProxyError
from router.kube import connect

log = logging.getLogger("router.tokenreview")

FAILURE_TTL = 1.0
"""Seconds a failed review is remembered: long enough to spare a struggling API a retry per
request, short enough that nobody is turned away for long once it is back."""
REVIEW_TIMEOUT = 5.0
CACHE_SIZE = 10_000
THREADS = 4

Review = Callable[[str], bool]
"""A blocking call: is this token authenticated? Raises when the API cannot say."""


def unavailable() -> ProxyError:
    return ProxyError(503, "The token could not be verified now; try again.",
                      ((b"retry-after", b"1"),))


def kube_review(config: Config) -> tuple[Review, Callable[[], None]]:
    """A `Review` through the Kubernetes API (`--kubeconfig`, else in-cluster), and what
    closes its client. Blocking: call from a thread."""
    api_client = connect(config)
    api = k8s.AuthenticationV1Api(api_client)
    audiences = list(config.authz_tokenreview_audiences) or None

    def review(token: str) -> bool:
        body = k8s.V1TokenReview(spec=k8s.V1TokenReviewSpec(token=token, audiences=audiences))
        answer = api.create_token_review(body, _request_timeout=REVIEW_TIMEOUT)
        return bool(answer.status is not None and answer.status.authenticated)

    return review, api_client.close


class TokenReviewer:
    """The tokenreview `Authorizer`. Every cache and the in-flight table are touched only on
    the event loop; only `review` runs in a thread."""

    def __init__(self, review: Review, ttl: float, close: Callable[[], None] = lambda: None
                 ) -> None:
        self._review = review
        self._close = close
        self._decisions: TTLCache[bytes, bool] = TTLCache(CACHE_SIZE, ttl)
        self._failures: TTLCache[bytes, bool] = TTLCache(CACHE_SIZE, FAILURE_TTL)
        self._inflight: dict[bytes, asyncio.Task[bool | None]] = {}
        self._threads = ThreadPoolExecutor(THREADS, thread_name_prefix="tokenreview")

    async def authorize(self, token: str | None, target: Target) -> None:
        if token is None:
            raise unauthenticated(NO_CREDENTIAL)
        key = hashlib.sha256(token.encode("latin-1")).digest()
        authenticated = self._decisions.get(key)
        if authenticated is None and key not in self._failures:
            task = self._inflight.get(key)
            if task is None:
                task = asyncio.create_task(self._ask(key, token))
                self._inflight[key] = task
            # Shielded: a client that leaves does not cancel the review others wait for.
            authenticated = await asyncio.shield(task)
        if authenticated is None:
            raise unavailable()
        if not authenticated:
            raise unauthenticated()

    async def _ask(self, key: bytes, token: str) -> bool | None:
        """One review; its answer cached. None: the API could not answer."""
        try:
            loop = asyncio.get_running_loop()
            authenticated = await loop.run_in_executor(self._threads, self._review, token)
        except Exception as exc:
            log.warning("TokenReview failed, answering 503 for %.0f s: %s", FAILURE_TTL, exc)
            self._failures[key] = True
            return None
        finally:
            del self._inflight[key]
        self._decisions[key] = authenticated
        return authenticated

    async def close(self) -> None:
        await asyncio.to_thread(self._shutdown)

    def _shutdown(self) -> None:
        self._threads.shutdown(wait=True, cancel_futures=True)
        self._close()
