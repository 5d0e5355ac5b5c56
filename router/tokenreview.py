"""`--authz-mode tokenreview`: the bearer token is whatever the cluster's API server accepts
(a ServiceAccount token, an OIDC token ...), asked with an `authentication.k8s.io/v1`
TokenReview.

The official client is synchronous: a review runs in a small pool of threads of its own, so
neither the event loop nor the default executor (DNS lookups use it) waits on the API.
Answers are cached by the token's SHA-256, never the token, for `--authz-tokenreview-ttl`,
approvals and denials apart (random tokens, each a denial, cannot push out the tokens
that work); a failed call (the API down, a timeout) for `FAILURE_TTL` only, answered 503,
so an outage is neither a stampede on the API nor a denial that outlives it.

Anyone who can reach the port can send tokens, each a review: so reviews are shared and
bounded (`router.shared_calls`). One per token at a time; at most `THREADS` under way,
with requests for other tokens waiting for one to end, at most `MAX_WAITING` of them (then
503 at once), and no request waits longer than `REVIEW_WAIT` for its answer (then 503);
two more for tokens approved before, so that a flood cannot lock their callers out.
Unbounded, 200 random tokens against an API answering in 0.5 s held a new valid token 27 s,
and every one of them reached the API server.

With `--authz-tokenreview-audiences`, an authenticated answer must also name one of them
in `status.audiences`: the API documents that check as the client's, since an
authenticator unaware of audiences (a webhook) authenticates a token meant for another.

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
from router.shared_calls import Bounds, CallFailed, SharedCalls

log = logging.getLogger("router.tokenreview")

FAILURE_TTL = 1.0
"""Seconds a failed review is remembered: long enough to spare a struggling API a retry per
request, short enough that nobody is turned away for long once it is back."""
REVIEW_TIMEOUT = 5.0
"""The API call's own timeout, the whole call (the client makes a number a total)."""
REVIEW_WAIT = 2 * REVIEW_TIMEOUT
"""The longest a request waits for its answer, a free thread included: then 503."""
CACHE_SIZE = 10_000
"""Approvals kept; as many denials, apart."""
THREADS = 4
"""Reviews of new tokens under way at most; two more for tokens approved before."""
MAX_WAITING = 256
"""Requests for other tokens waiting for a thread, per lane: beyond, 503 at once."""
RENEW_WINDOW = 10
"""A token approved within this many `--authz-tokenreview-ttl`s is reviewed again in
slots of its own: random tokens cannot lock out a caller whose approval just expired."""

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
        status = api.create_token_review(body, _request_timeout=REVIEW_TIMEOUT).status
        if status is None or not status.authenticated:
            return False
        if audiences and not set(status.audiences or ()) & set(audiences):
            log.warning("a TokenReview authenticated a token without naming an audience "
                        "asked for (%s): refused", ", ".join(audiences))
            return False
        return True

    return review, api_client.close


class TokenReviewer:
    """The tokenreview `Authorizer`. Every cache and the calls under way are touched only
    on the event loop; only `review` runs in a thread."""

    def __init__(self, review: Review, ttl: float, close: Callable[[], None] = lambda: None
                 ) -> None:
        self._review = review
        self._close = close
        self._approved: TTLCache[bytes, bool] = TTLCache(CACHE_SIZE, ttl)
        self._denied: TTLCache[bytes, bool] = TTLCache(CACHE_SIZE, ttl)
        bounds = Bounds(slots=THREADS, renewal_slots=2, max_waiting=MAX_WAITING,
                        failure_ttl=FAILURE_TTL, renew_window=RENEW_WINDOW * ttl)
        self._calls: SharedCalls[bytes, bool] = SharedCalls(
            self._decided, bounds, renews=lambda approved: approved)
        self._threads = ThreadPoolExecutor(bounds.slots + bounds.renewal_slots,
                                           thread_name_prefix="tokenreview")

    async def authorize(self, token: str | None, target: Target) -> None:
        if token is None:
            raise unauthenticated(NO_CREDENTIAL)
        key = hashlib.sha256(token.encode("latin-1")).digest()
        authenticated = self._decided(key)
        if authenticated is None:
            try:
                async with asyncio.timeout(REVIEW_WAIT):
                    authenticated = await self._calls(key, lambda: self._ask(key, token))
            except (CallFailed, TimeoutError):
                raise unavailable() from None
        if not authenticated:
            raise unauthenticated()

    def _decided(self, key: bytes) -> bool | None:
        if key in self._approved:
            return True
        if key in self._denied:
            return False
        return None

    async def _ask(self, key: bytes, token: str) -> bool:
        """One review in a thread of this authorizer's; its answer kept."""
        try:
            loop = asyncio.get_running_loop()
            authenticated = await loop.run_in_executor(self._threads, self._review, token)
        except Exception as exc:
            log.warning("TokenReview failed, answering 503 for %.0f s: %s", FAILURE_TTL, exc)
            raise
        (self._approved if authenticated else self._denied)[key] = True
        return authenticated

    async def close(self) -> None:
        self._calls.close()
        await asyncio.to_thread(self._shutdown)

    def _shutdown(self) -> None:
        self._threads.shutdown(wait=True, cancel_futures=True)
        self._close()
