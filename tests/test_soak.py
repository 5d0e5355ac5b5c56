"""The fault-injection soak, short (a few thousand requests, one worker): the same code as
`make soak`, so the suite keeps the soak itself working and catches a regression in any of
its rules."""

from __future__ import annotations

import pytest

from soak.load import KiB
from soak.run import Options, soak
from soak.verdict import Verdict


@pytest.fixture(scope="module")
def verdict(tmp_path_factory: pytest.TempPathFactory) -> Verdict:
    options = Options(requests=3000, concurrency=64, workers=1, max_size=256 * KiB)
    return soak(options, tmp_path_factory.mktemp("soak"))


def test_the_soak_meets_its_faults(verdict: Verdict) -> None:
    """Not a quiet run: pods went down, answered 503 and were cut while it lasted."""
    assert verdict.outages > 0, verdict.report()
    assert verdict.pod_ends["answered 503"] > 0, verdict.report()
    assert verdict.pod_ends["answered 200"] > 0, verdict.report()


def test_every_rule_holds(verdict: Verdict) -> None:
    """No loss, no replay, no 500, bodies identical, counters equal, flat RSS and
    descriptors: every check of `soak/verdict.py`."""
    failed = [name for name, check in verdict.checks.items() if not check.ok]
    assert not failed, verdict.report()
