"""The fault-injection soak, short (a few thousand requests, one worker): the same code as
`make soak`, so the suite keeps the soak itself working and catches a regression in any of
its rules."""

from __future__ import annotations

import pytest

from soak.load import KiB
from soak.run import Options, soak
from soak.verdict import NO_500, NO_REPLAY, Verdict


@pytest.fixture(scope="module")
def verdict(tmp_path_factory: pytest.TempPathFactory) -> Verdict:
    options = Options(requests=3000, concurrency=64, workers=1, max_size=256 * KiB)
    return soak(options, tmp_path_factory.mktemp("soak"))


def test_the_soak_meets_its_faults(verdict: Verdict) -> None:
    """Not a quiet run: pods went down, answered 503 and were cut while it lasted."""
    assert verdict.outages > 0, verdict.report()
    assert verdict.pod_ends["answered 503"] > 0, verdict.report()
    assert verdict.pod_ends["answered 200"] > 0, verdict.report()


UPSTREAM_FAULTS = "lands with the upstream-faults branch (issue 10, items 1 and 3)"


def test_every_rule_holds_but_those_of_the_upstream_faults_branch(verdict: Verdict) -> None:
    failed = [name for name, check in verdict.checks.items()
              if name not in (NO_REPLAY, NO_500) and not check.ok]
    assert not failed, verdict.report()


@pytest.mark.xfail(strict=False, reason="replay rule " + UPSTREAM_FAULTS)
def test_no_request_a_pod_received_is_sent_again(verdict: Verdict) -> None:
    assert verdict.checks[NO_REPLAY].ok, verdict.report()


@pytest.mark.xfail(strict=False, reason="a write to a closed pod connection " + UPSTREAM_FAULTS)
def test_no_exception_escapes_as_a_500(verdict: Verdict) -> None:
    assert verdict.checks[NO_500].ok, verdict.report()
