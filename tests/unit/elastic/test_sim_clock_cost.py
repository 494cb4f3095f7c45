"""The simulator's event clock and its cost model fitted to the measured GPU steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.elastic.sim.clock import EventClock
from cluster.elastic.sim.cost import DECODE_CONTEXT, fit_cost_model

RESULTS = Path(__file__).resolve().parents[3] / "benchmarks" / "results"


def test_events_run_in_time_order_and_ties_in_schedule_order() -> None:
    clock = EventClock()
    seen = []
    clock.at(2.0, lambda: seen.append(("b", clock.now)))
    clock.at(1.0, lambda: seen.append(("a", clock.now)))
    clock.at(2.0, lambda: seen.append(("c", clock.now)))
    clock.run()
    assert seen == [("a", 1.0), ("b", 2.0), ("c", 2.0)]


def test_events_scheduled_by_events_and_cancelled_ones() -> None:
    clock = EventClock()
    seen = []

    def first() -> None:
        seen.append(clock.now)
        clock.after(0.5, lambda: seen.append(clock.now))

    clock.at(1.0, first)
    dropped = clock.at(1.2, lambda: seen.append("never"))
    clock.cancel(dropped)
    clock.run(until_s=1.4)
    assert seen == [1.0] and clock.now == 1.4  # the 1.5 event is still to come
    clock.run()
    assert seen == [1.0, 1.5] and clock.pending == 0
    with pytest.raises(ValueError, match="clock is at"):
        clock.at(1.0, lambda: None)


@pytest.fixture(scope="module")
def cost():
    return fit_cost_model(RESULTS / "gpu_h100_decode.json", RESULTS / "gpu_h100_pd.json")


def test_the_fit_reproduces_the_measured_steps(cost) -> None:
    data = json.loads((RESULTS / "gpu_h100_decode.json").read_text())
    for row in data["rows"]:
        if row["model"] == "llama3-8b" and row["overlap"]:
            fitted = cost.step_s([], [DECODE_CONTEXT] * row["batch"]) * 1e3
            assert fitted == pytest.approx(row["tpot_ms"], rel=0.03), row["batch"]
    for length, (tokens_per_s, _) in data["prefill"].items():
        assert int(length) / cost.prefill_s(int(length)) == pytest.approx(tokens_per_s, rel=1e-6)


def test_the_cost_model_has_the_shape_of_the_hardware(cost) -> None:
    # Decode is bound by the weights: batch 8 costs little more than batch 1.
    assert cost.step_s([], [1024] * 8) < 1.1 * cost.step_s([], [1024])
    # Longer contexts cost more per step; prefill per token gets dearer with length.
    assert cost.step_s([], [4096] * 64) > cost.step_s([], [1024] * 64)
    assert cost.prefill_s(8192) / 8192 > cost.prefill_s(1024) / 1024
    # A chunk after a cached prefix costs its attention over the prefix.
    assert cost.step_s([(2048, 2048)], []) > cost.step_s([(0, 2048)], [])
    # The KV tail after the first token grows with the prompt and stays small.
    assert 0 < cost.transfer_tail_s(1024) < cost.transfer_tail_s(4096) < 0.01
    assert cost.step_s([], []) == 0.0


def test_a_results_file_without_the_rows_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": [], "prefill": {}}))
    with pytest.raises(ValueError, match="needs"):
        fit_cost_model(bad)
