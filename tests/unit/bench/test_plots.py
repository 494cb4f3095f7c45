"""Plot files and the series behind them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cluster.bench.client import RequestRecord
from cluster.bench.plots import running_over_time, tokens_per_second_bins, write_plots

pytest.importorskip("matplotlib")


def _records(count: int = 40) -> list[RequestRecord]:
    rng = np.random.default_rng(0)
    records = []
    for i in range(count):
        ttft = float(rng.uniform(0.05, 0.3))
        itl = [float(g) for g in rng.uniform(0.01, 0.03, size=19)]
        e2e = ttft + sum(itl)
        records.append(RequestRecord(i, True, "", i * 0.1, ttft, e2e, itl, 16, 20, True, 20))
    records.append(RequestRecord(count, False, "HTTP 500: x", 0.2, None, 0.05))
    return records


def test_plot_files_are_written_and_not_empty(tmp_path: Path):
    records = _records()
    duration = max(r.end_s for r in records)
    paths = write_plots(records, duration, tmp_path / "plots", "test", {"ttft": 200})
    assert [p.name for p in paths] == ["latency_cdf.png", "throughput.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 20_000  # axes, curves and labels, not a blank canvas


def test_plots_survive_single_token_outputs(tmp_path: Path):
    # No TPOT or ITL samples at all: those panels say so instead of failing.
    records = [RequestRecord(0, True, "", 0.0, 0.1, 0.1, [], 5, 1, True, 1)]
    for path in write_plots(records, 0.1, tmp_path, ""):
        assert path.stat().st_size > 10_000


def test_token_bins_add_up_to_the_output_tokens():
    records = _records()
    assert max(r.end_s for r in records) < 4.7
    starts, widths, rates = tokens_per_second_bins(records, 4.7)
    assert list(starts) == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert widths.tolist() == pytest.approx([1.0, 1.0, 1.0, 1.0, 0.7])
    total = sum(r.output_tokens for r in records if r.success)
    assert (rates * widths).sum() == pytest.approx(total)
    # A short tail is merged into the last full second instead of becoming a thin bin.
    starts, widths, rates = tokens_per_second_bins(records, 4.2)
    assert list(starts) == [0.0, 1.0, 2.0, 3.0] and widths[-1] == pytest.approx(1.2)
    assert (rates * widths).sum() == pytest.approx(total)


def test_running_requests_step_function():
    records = [
        RequestRecord(0, True, "", 0.0, 0.1, 1.0),
        RequestRecord(1, True, "", 0.5, 0.1, 1.0),
        RequestRecord(2, True, "", 1.0, 0.1, 1.0),  # starts as the first ends
    ]
    times, running = running_over_time(records)
    assert list(running) == [0, 1, 2, 1, 2, 1, 0]
    assert list(times) == [0.0, 0.0, 0.5, 1.0, 1.0, 1.5, 2.0]
    assert running.max() == 2  # the end at t=1 is counted before the start at t=1
