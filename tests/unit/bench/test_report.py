"""Summary statistics, goodput, the printed table and the JSON file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.bench import BenchError
from cluster.bench.client import RequestRecord
from cluster.bench.report import (
    format_summary,
    latency_stats_ms,
    meets_slo,
    parse_slo,
    read_json,
    summarize,
    write_json,
)


def _record(
    index: int, ttft: float, e2e: float, tokens: int, success: bool = True, error: str = ""
) -> RequestRecord:
    """A record whose chunks are evenly spaced: TPOT = (e2e - ttft) / (tokens - 1)."""
    gaps = [(e2e - ttft) / (tokens - 1)] * (tokens - 1) if tokens > 1 else []
    return RequestRecord(
        index, success, error, index * 0.1, ttft, e2e, gaps, 10, tokens, True, tokens
    )


# TTFT ms / TPOT ms: a 100/10, b 300/10, c 100/50, d 100/(single token), e failed
RECORDS = [
    _record(0, 0.100, 0.100 + 9 * 0.010, 10),
    _record(1, 0.300, 0.300 + 9 * 0.010, 10),
    _record(2, 0.100, 0.100 + 9 * 0.050, 10),
    _record(3, 0.100, 0.100, 1),
    RequestRecord(4, False, "HTTP 503: overloaded", 0.4, None, 0.01),
]


def test_goodput_counts_requests_meeting_every_slo():
    summary = summarize(RECORDS, duration_s=2.0, slo_ms={"ttft": 200, "tpot": 20})
    # a meets both; b misses TTFT; c misses TPOT; d has no TPOT, meets TTFT; e failed
    assert [meets_slo(r, summary.slo_ms) for r in RECORDS] == [True, False, False, True, False]
    assert summary.good_requests == 2
    assert summary.goodput == pytest.approx(1.0)  # 2 requests / 2 s
    assert summary.slo_attainment == pytest.approx(2 / 5)  # failed requests count against


def test_single_slo_and_no_slo():
    assert summarize(RECORDS, 2.0, {"tpot": 20}).good_requests == 3
    plain = summarize(RECORDS, 2.0)
    assert plain.good_requests is None and plain.goodput is None


def test_throughputs_and_counts():
    s = summarize(RECORDS, duration_s=2.0)
    assert (s.completed, s.failed) == (4, 1)
    assert s.total_output_tokens == 31 and s.total_input_tokens == 40
    assert s.request_throughput == pytest.approx(2.0)
    assert s.output_throughput == pytest.approx(15.5)
    assert s.total_token_throughput == pytest.approx(35.5)
    assert s.errors == {"HTTP 503: overloaded": 1}


def test_latency_statistics_in_ms():
    s = summarize(RECORDS, duration_s=2.0)
    assert s.latency_ms["ttft"]["mean"] == pytest.approx(150.0)
    assert s.latency_ms["ttft"]["median"] == pytest.approx(100.0)
    assert s.latency_ms["tpot"]["mean"] == pytest.approx((10 + 10 + 50) / 3)  # d has no TPOT
    assert s.latency_ms["itl"]["median"] == pytest.approx(10.0)  # 18 gaps of 10, 9 of 50
    stats = latency_stats_ms([i / 1000 for i in range(1, 101)])
    assert stats["p90"] == pytest.approx(90.1) and stats["p99"] == pytest.approx(99.01)
    assert latency_stats_ms([]) == {"mean": None, "median": None, "p90": None, "p99": None}


def test_zero_duration_does_not_divide_by_zero():
    s = summarize([], duration_s=0.0)
    assert s.request_throughput == 0.0 and s.completed == 0


def test_parse_slo():
    assert parse_slo("ttft=200, TPOT=50.5") == {"ttft": 200.0, "tpot": 50.5}
    for bad in ("", "ttft", "itl=5", "ttft=abc", "ttft=-1"):
        with pytest.raises(BenchError):
            parse_slo(bad)


def test_table_has_every_line():
    text = format_summary(summarize(RECORDS, 2.0, {"ttft": 200}), {"Model": "m"})
    for needle in (
        "Model:",
        "Successful requests:",
        "Failed requests:",
        "Benchmark duration (s):",
        "Request throughput (req/s):",
        "Output token throughput (tok/s):",
        "Total token throughput (tok/s):",
        "Requests meeting SLO:",
        "Goodput (req/s):",
        "1 x HTTP 503: overloaded",
    ):
        assert needle in text
    ttft_row = next(line for line in text.splitlines() if line.startswith("TTFT"))
    assert ttft_row.split()[1:] == ["150.00", "100.00", "240.00", "294.00"]


def test_json_round_trips(tmp_path: Path):
    summary = summarize(RECORDS, 2.0, {"ttft": 200, "tpot": 20})
    config = {"endpoint": "completions", "request_rate": "inf"}
    path = tmp_path / "out" / "bench.json"
    write_json(path, config, summary, RECORDS)
    raw = json.loads(path.read_text())
    assert set(raw) == {"config", "summary", "requests"}
    assert raw["requests"][0]["tpot_s"] == pytest.approx(0.01)
    config2, summary2, records2 = read_json(path)
    assert config2 == config
    assert summary2 == summary
    assert records2 == RECORDS
