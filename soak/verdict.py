"""The soak's checks: the client's results and the pods' logs joined by request id, plus
the router's resource samples and counters. Each check is named and lists its violations,
so a failure says which request broke which rule and what each side saw."""

from __future__ import annotations

import collections
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from soak.load import Planned, Result
from soak.pods import Log, Outage, Receipt

ALL_BUSY = "All warm pool pods are busy."
NO_POD = "Could not connect to any warm pool pod."
STATUSES = {200, 500, 502, 503, 504}  # 500: see `no_500`
SHOWN = 10
NO_REPLAY = ("no request a pod received was sent again, or answered as never received, "
             "unless it answered 503")
NO_500 = "no 500: no exception escaped the app"
UNHANDLED = "Exception in ASGI application"


@dataclass
class Check:
    name: str
    violations: list[str] = field(default_factory=list)
    count: int = 0  # all of them; `violations` keeps the first few
    measured: str = ""  # what a check that passed saw, where a figure says more than PASS

    @property
    def ok(self) -> bool:
        return self.count == 0

    def fail(self, text: str) -> None:
        self.count += 1
        if len(self.violations) < SHOWN:
            self.violations.append(text)

    def __str__(self) -> str:
        if self.ok:
            return f"PASS {self.name}" + (f" ({self.measured})" if self.measured else "")
        shown = "".join(f"\n    {text}" for text in self.violations)
        return f"FAIL {self.name}: {self.count} violation(s){shown}"


@dataclass(frozen=True)
class Sample:
    """The router's processes, summed: resident memory and open descriptors."""

    at: float
    rss: int
    fds: int


@dataclass
class Verdict:
    """Every check by name; what the client saw (`outcomes`) and what the pods did
    (`pod_ends`: how their parts of requests ended; `outages`), so a run can be shown to
    have met the faults it was meant to."""

    checks: dict[str, Check]
    outcomes: Mapping[str, int]
    pod_ends: Mapping[str, int]
    outages: int

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks.values())

    def report(self) -> str:
        return "\n".join([f"client: {_counts(self.outcomes)}",
                          f"pods: {_counts(self.pod_ends)}; {self.outages} listener outages",
                          *(str(check) for check in self.checks.values())])


def _counts(counter: Mapping[str, int]) -> str:
    return ", ".join(f"{name} {count}" for name, count in sorted(counter.items()))


def judge(planned: Sequence[Planned], results: Sequence[Result], log: Log,
          samples: Sequence[Sample], counters: Mapping[tuple[str, str], float],
          router_log: str, access_log: str) -> Verdict:
    by_id = {result.request_id: result for result in results}
    routed = access_statuses(access_log)
    receipts: dict[str, list[Receipt]] = collections.defaultdict(list)
    for receipt in sorted(log.receipts, key=lambda r: r.received):
        receipts[receipt.request_id].append(receipt)
    pods = sorted({receipt.pod for receipt in log.receipts} | {o.pod for o in log.outages})
    checks = [
        answered(planned, by_id, routed),
        cut_only_by_a_pod(results, receipts, log.resets),
        no_replay(results, receipts),
        pool_errors_only_when_no_pod_could_serve(results, receipts, log.outages, pods),
        byte_identical(results),
        resources_flat(samples),
        counters_match(results, counters, routed),
        no_500(results, router_log, routed),
        router_log_clean(router_log),
    ]
    outcomes = collections.Counter(
        f"{r.outcome}" if r.outcome != "answer" else f"{r.status} {r.detail}" for r in results
    )
    pod_ends = collections.Counter(f"{r.end} {r.status or ''}".strip() for r in log.receipts)
    return Verdict({check.name: check for check in checks}, outcomes, pod_ends,
                   len(log.outages))


def access_statuses(text: str) -> dict[str, int]:
    """The status of each request the router's access log has, by request id."""
    statuses = {}
    for line in text.splitlines():
        record = json.loads(line)
        statuses[record["request_id"]] = record["status"]
    return statuses


def answered(planned: Sequence[Planned], by_id: Mapping[str, Result],
             routed: Mapping[str, int]) -> Check:
    """None lost or hung: every request ends in an answer the client can classify. A
    client whose connection the router reset while it was still sending a body saw no
    answer head; the router's access line says what the answer was."""
    check = Check("none lost or hung")
    for request in planned:
        result = by_id.get(request.request_id)
        if result is None:
            check.fail(f"{request.request_id}: no result")
        elif result.outcome == "hung" or (result.outcome == "refused"
                                          and result.request_id not in routed):
            check.fail(f"{result.request_id} {result.kind}: {result.outcome} {result.detail}"
                       f" (router: {routed.get(result.request_id, 'no access line')})")
        elif result.status and result.status not in STATUSES:
            check.fail(f"{result.request_id} {result.kind}: status {result.status}")
    if len(routed) != len(planned):
        check.fail(f"{len(planned)} requests sent, {len(routed)} in the router's access log")
    return check


def cut_only_by_a_pod(results: Iterable[Result], receipts: Mapping[str, list[Receipt]],
                      resets: Sequence[tuple[str, float]]) -> Check:
    """An answer cut short is one its pod cut, or lost when the pod reset its connections
    (a reset drops what the kernel had not sent yet, even of an answer written whole)."""
    check = Check("answers cut only when their pod failed mid-answer")
    for result in results:
        if result.outcome != "cut":
            continue
        ends = [r.end for r in receipts.get(result.request_id, []) if r.pod == result.pod]
        died = any(pod == result.pod and result.started <= at <= result.ended
                   for pod, at in resets)
        if not died and (not ends or ends[-1] not in ("cut", "reset")):
            check.fail(f"{result.request_id} {result.kind} from {result.pod or '?'}: cut; "
                       f"the pod's side: {ends or 'nothing received'}")
    return check


def no_replay(results: Iterable[Result], receipts: Mapping[str, list[Receipt]]) -> Check:
    """A request a pod received goes to no other pod (nor again to it) unless that pod
    answered 503; nor is it answered "could not connect" or "all busy", which tell the
    client nothing was done."""
    check = Check(NO_REPLAY)
    for request_id, seen in receipts.items():
        for earlier in seen[:-1]:
            if earlier.status != 503:
                later = seen[seen.index(earlier) + 1]
                check.fail(
                    f"{request_id} {earlier.method}: {earlier.pod} received it, held it "
                    f"{earlier.ended - earlier.received:.2f} s and ended '{earlier.end}', "
                    f"then {later.pod} received it ({len(seen)} deliveries)")
                break
    for result in results:
        acted = [r for r in receipts.get(result.request_id, []) if r.status != 503]
        if result.detail in (ALL_BUSY, NO_POD) and acted:
            check.fail(f"{result.request_id} {result.method}: answered '{result.detail}' "
                       f"although {acted[0].pod} received it and ended '{acted[0].end}'")
    return check


def pool_errors_only_when_no_pod_could_serve(
    results: Iterable[Result], receipts: Mapping[str, list[Receipt]],
    outages: Sequence[Outage], pods: Sequence[str],
) -> Check:
    """"All busy" only when every pod answered this request 503 or was not listening
    during it; "could not connect" only when every pod was not listening during it."""
    check = Check("'all busy' / 'could not connect' only when no pod could serve")
    for result in results:
        if result.detail not in (ALL_BUSY, NO_POD):
            continue
        busy = {r.pod for r in receipts.get(result.request_id, []) if r.status == 503}
        down = {o.pod for o in outages if o.start <= result.ended and o.end >= result.started}
        excused = down | busy if result.detail == ALL_BUSY else down
        able = [pod for pod in pods if pod not in excused]
        if able:
            check.fail(f"{result.request_id} {result.kind}: {result.status} "
                       f"'{result.detail}' while {', '.join(able)} could serve "
                       f"(busy: {sorted(busy)}, down: {sorted(down)})")
    return check


def byte_identical(results: Iterable[Result]) -> Check:
    check = Check("bodies and answers byte-identical")
    for result in results:
        if result.outcome == "wrong":
            check.fail(f"{result.request_id} {result.kind} via {result.pod}: body differs")
    return check


def resources_flat(samples: Sequence[Sample]) -> Check:
    """The second half of the run holds no more memory or descriptors than the first
    half's peak, with a margin for noise: a leak grows with requests."""
    check = Check("router RSS and open descriptors flat")
    if len(samples) < 4:
        check.fail(f"only {len(samples)} samples")
        return check
    half = len(samples) // 2
    first, second = samples[:half], samples[half:]
    rss_first, rss_second = max(s.rss for s in first), max(s.rss for s in second)
    if rss_second > rss_first * 1.25 + 32 * 1024 * 1024:
        check.fail(f"RSS peak {rss_first >> 20} MiB in the first half, "
                   f"{rss_second >> 20} MiB in the second")
    fds_first, fds_second = max(s.fds for s in first), max(s.fds for s in second)
    if fds_second > fds_first * 1.25 + 64:
        check.fail(f"descriptors peak {fds_first} in the first half, {fds_second} in the second")
    check.measured = (f"peaks, first half -> second: RSS {rss_first >> 20} -> "
                      f"{rss_second >> 20} MiB, descriptors {fds_first} -> {fds_second}")
    return check


def counters_match(results: Iterable[Result], counters: Mapping[tuple[str, str], float],
                   routed: Mapping[str, int]) -> Check:
    """`requests_total` by method and code equals the client's own count of answer heads
    (plus, for a request whose connection was reset under its upload, the status of its
    access line: the answer the client never got to read)."""
    check = Check("router counters equal the client's counts")
    seen = collections.Counter(
        (r.method, str(r.status or routed[r.request_id])) for r in results
        if r.status or (r.outcome == "refused" and r.request_id in routed))
    for key in sorted(set(seen) | set(counters)):
        if seen.get(key, 0) != counters.get(key, 0):
            check.fail(f"{key[0]} {key[1]}: client {seen.get(key, 0)}, "
                       f"router {counters.get(key, 0):g}")
    return check


def no_500(results: Iterable[Result], text: str, routed: Mapping[str, int]) -> Check:
    """uvicorn answers 500 when an exception escapes the app, and logs it: both sides."""
    check = Check(NO_500)
    for result in results:
        if result.status == 500 or routed.get(result.request_id) == 500:
            check.fail(f"{result.request_id} {result.kind}: 500")
    for line in text.splitlines():
        if UNHANDLED in line:
            check.fail(_log_line(line))
    return check


def router_log_clean(text: str) -> Check:
    """Any other error line or traceback."""
    check = Check("no other error or traceback in the router's log")
    for line in text.splitlines():
        if UNHANDLED not in line and ("Traceback" in line or '"level": "error"' in line):
            check.fail(_log_line(line))
    return check


def _log_line(line: str) -> str:
    """A JSON log line as its time, message and the traceback's last line (the error)."""
    try:
        record = json.loads(line)
    except ValueError:
        return line[:300]
    error = str(record.get("error", "")).strip().splitlines()
    return f"{record.get('time')} {str(record.get('message')).strip()} {error[-1:]}"
