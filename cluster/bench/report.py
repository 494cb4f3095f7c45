"""Turn request records into the numbers a benchmark reports, as text and as JSON.

Conventions: latencies are over successful requests only; ITL pools the gaps of all requests;
TPOT is per request and undefined (left out) for single-token outputs; throughputs divide by
the whole run's duration; goodput counts requests that succeeded and met every given SLO, and
SLO attainment divides that count by all requests, failed ones included.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cluster.bench import BenchError
from cluster.bench.client import RequestRecord

METRICS = ("ttft", "tpot", "itl", "e2e")
SLO_METRICS = ("ttft", "tpot", "e2e")
_STAT_NAMES = ("mean", "median", "p90", "p99")


@dataclass(frozen=True)
class Summary:
    duration_s: float
    completed: int
    failed: int
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float  # req/s
    output_throughput: float  # tok/s
    total_token_throughput: float  # (input + output) tok/s
    latency_ms: dict[str, dict[str, float | None]]  # metric -> mean/median/p90/p99
    slo_ms: dict[str, float] = field(default_factory=dict)
    good_requests: int | None = None
    goodput: float | None = None  # req/s meeting every SLO
    slo_attainment: float | None = None  # fraction of all requests meeting every SLO
    errors: dict[str, int] = field(default_factory=dict)  # error text -> count

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Summary:
        return cls(**data)


def parse_slo(text: str) -> dict[str, float]:
    """ "ttft=200,tpot=50" -> {"ttft": 200.0, "tpot": 50.0} (milliseconds)."""
    slo: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip().lower()
        if not sep or name not in SLO_METRICS:
            raise BenchError(f"--slo: expected NAME=MS with NAME in {', '.join(SLO_METRICS)}")
        try:
            slo[name] = float(value)
        except ValueError as exc:
            raise BenchError(f"--slo {name}: {value!r} is not a number of milliseconds") from exc
        if not slo[name] > 0:
            raise BenchError(f"--slo {name}: must be positive")
    if not slo:
        raise BenchError("--slo: give at least one NAME=MS")
    return slo


def latency_stats_ms(values_s: list[float]) -> dict[str, float | None]:
    if not values_s:
        return dict.fromkeys(_STAT_NAMES)
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    return {
        "mean": float(ms.mean()),
        "median": float(np.percentile(ms, 50)),
        "p90": float(np.percentile(ms, 90)),
        "p99": float(np.percentile(ms, 99)),
    }


def metric_values_s(records: list[RequestRecord], metric: str) -> list[float]:
    """The samples of one metric over successful requests, in seconds."""
    ok = [r for r in records if r.success]
    if metric == "itl":
        return [gap for r in ok for gap in r.itl_s]
    values = (getattr(r, f"{metric}_s") for r in ok)
    return [v for v in values if v is not None]


def meets_slo(record: RequestRecord, slo_ms: dict[str, float]) -> bool:
    if not record.success:
        return False
    for name, bound in slo_ms.items():
        value = getattr(record, f"{name}_s")
        if value is not None and value * 1000.0 > bound:
            return False
    return True


def summarize(
    records: list[RequestRecord], duration_s: float, slo_ms: dict[str, float] | None = None
) -> Summary:
    ok = [r for r in records if r.success]
    per_s = 1.0 / duration_s if duration_s > 0 else 0.0
    input_tokens = sum(r.prompt_tokens or 0 for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    good = sum(meets_slo(r, slo_ms) for r in records) if slo_ms else None
    return Summary(
        duration_s=duration_s,
        completed=len(ok),
        failed=len(records) - len(ok),
        total_input_tokens=input_tokens,
        total_output_tokens=output_tokens,
        request_throughput=len(ok) * per_s,
        output_throughput=output_tokens * per_s,
        total_token_throughput=(input_tokens + output_tokens) * per_s,
        latency_ms={m: latency_stats_ms(metric_values_s(records, m)) for m in METRICS},
        slo_ms=dict(slo_ms or {}),
        good_requests=good,
        goodput=None if good is None else good * per_s,
        slo_attainment=None if good is None else good / max(len(records), 1),
        errors=dict(Counter(r.error for r in records if not r.success).most_common()),
    )


# -- text ----------------------------------------------------------------------------------------

_WIDTH = 62


def format_summary(summary: Summary, header: dict[str, str] | None = None) -> str:
    lines = [" pdserve bench ".center(_WIDTH, "=")]
    lines += [_row(key, value) for key, value in (header or {}).items()]
    lines += [
        _row("Successful requests", summary.completed),
        _row("Failed requests", summary.failed),
        _row("Benchmark duration (s)", f"{summary.duration_s:.2f}"),
        _row("Total input tokens", summary.total_input_tokens),
        _row("Total output tokens", summary.total_output_tokens),
        _row("Request throughput (req/s)", f"{summary.request_throughput:.2f}"),
        _row("Output token throughput (tok/s)", f"{summary.output_throughput:.2f}"),
        _row("Total token throughput (tok/s)", f"{summary.total_token_throughput:.2f}"),
        " Latency (ms) ".center(_WIDTH, "-"),
        f"{'':<10}" + "".join(f"{name:>13}" for name in _STAT_NAMES),
    ]
    for metric in METRICS:
        stats = summary.latency_ms[metric]
        lines.append(f"{metric.upper():<10}" + "".join(_cell(stats[s]) for s in _STAT_NAMES))
    if summary.slo_ms:
        lines += _slo_lines(summary)
    if summary.errors:
        lines.append(" Errors ".center(_WIDTH, "-"))
        for text, count in list(summary.errors.items())[:5]:
            lines.append(f"{count:>6} x {text[: _WIDTH - 9]}")
    lines.append("=" * _WIDTH)
    return "\n".join(lines)


def _slo_lines(summary: Summary) -> list[str]:
    bounds = ", ".join(f"{k} <= {v:g}" for k, v in summary.slo_ms.items())
    total = summary.completed + summary.failed
    attainment = summary.slo_attainment or 0.0
    return [
        f" SLO ({bounds} ms) ".center(_WIDTH, "-"),
        _row("Requests meeting SLO", f"{summary.good_requests} / {total} ({attainment:.1%})"),
        _row("Goodput (req/s)", f"{summary.goodput or 0.0:.2f}"),
    ]


def _row(label: str, value: object) -> str:
    text = str(value)
    # Right-align into the table width; long values (model paths) push out rather than clip.
    return f"{label}:{' ' * max(1, _WIDTH - len(label) - 1 - len(text))}{text}"


def _cell(value: float | None) -> str:
    return f"{'-':>13}" if value is None else f"{value:>13.2f}"


# -- JSON ----------------------------------------------------------------------------------------


def write_json(
    path: str | Path, config: dict[str, Any], summary: Summary, records: list[RequestRecord]
) -> None:
    """Summary in ms (as printed); per-request records in seconds (fields end in _s)."""
    data = {
        "config": config,
        "summary": summary.to_dict(),
        "requests": [r.to_dict() for r in records],
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # allow_nan=False: a NaN or inf here is a bug, and most JSON readers reject them anyway.
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def read_json(path: str | Path) -> tuple[dict[str, Any], Summary, list[RequestRecord]]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    records = [RequestRecord.from_dict(r) for r in data["requests"]]
    return data["config"], Summary.from_dict(data["summary"]), records
