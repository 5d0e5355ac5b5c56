"""The results as one Markdown table, the target checks, and the JSON record."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass
class Row:
    """One measured cell of one target. `throughput` is req/s for wrk cells and MiB/s
    (median of the repetitions) for transfers; ratios are filled in once the cell's
    other targets are measured."""

    cell: str
    target: str
    connections: int | None
    throughput: float
    unit: str
    requests: int | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    errors: int = 0  # socket errors and failed transfers
    non_2xx: int = 0
    cpu_seconds: float | None = None
    cpu_us_per_request: float | None = None  # wrk cells: the proxy's CPU ÷ requests answered
    cpu_cores: float | None = None  # wrk cells: CPU seconds ÷ the cell's seconds
    peak_rss_mib: float | None = None
    upstream_conns_per_1k: float | None = None  # while the load is steady
    upstream_conns_per_1k_cell: float | None = None  # over the whole cell, its edges included
    vs_nginx: float | None = None
    vs_direct: float | None = None
    vs_base: float | None = None


@dataclass(frozen=True)
class Check:
    target: str
    value: float
    goal: str
    ok: bool


_COLUMNS = (
    "cell", "target", "c", "req/s · MiB/s", "CPU µs/req", "CPU cores", "p50 ms", "p99 ms",
    "err / non-2xx", "÷nginx", "÷direct", "÷base", "CPU s", "peak RSS MiB",
    "new upstream conns / 1k req, steady (whole cell)",
)


def _num(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "–"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def table(rows: Sequence[Row]) -> str:
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    for r in rows:
        cells = [
            r.cell, r.target, str(r.connections or "–"),
            f"{_num(r.throughput, 1)} {r.unit}", _num(r.cpu_us_per_request, 1),
            _num(r.cpu_cores), _num(r.p50_ms), _num(r.p99_ms),
            f"{r.errors} / {r.non_2xx}", _num(r.vs_nginx), _num(r.vs_direct), _num(r.vs_base),
            _num(r.cpu_seconds), _num(r.peak_rss_mib, 1),
            f"{_num(r.upstream_conns_per_1k)} ({_num(r.upstream_conns_per_1k_cell)})",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def checks_text(checks: Sequence[Check]) -> str:
    return "\n".join(
        f"- {'PASS' if c.ok else 'FAIL'} {c.target}: {_num(c.value)} (goal {c.goal})"
        for c in checks
    )


def write_json(path: Path, meta: dict[str, Any], rows: Sequence[Row],
               checks: Sequence[Check]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"meta": meta, "rows": [asdict(r) for r in rows],
              "checks": [asdict(c) for c in checks]}
    path.write_text(json.dumps(record, indent=2) + "\n")
