"""SLO attainment over a sliding window."""

from __future__ import annotations

from cluster.elastic.slo_window import SloView, SloWindow


def test_attainment_counts_each_bound_and_failures() -> None:
    window = SloWindow(ttft_ms=100, tpot_ms=10, window_s=30)
    assert window.view(0.0).finished == 0 and window.view(0.0).attainment == 1.0
    window.record(1.0, ttft_s=0.05, tpot_s=0.005)  # both met
    window.record(2.0, ttft_s=0.5, tpot_s=0.005)  # TTFT missed
    window.record(3.0, ttft_s=0.05, tpot_s=None)  # one token: no TPOT to miss
    window.record_failure(4.0)
    view = window.view(5.0)
    assert (view.finished, view.failed) == (4, 1)
    assert view.ttft_attainment == 0.5 and view.tpot_attainment == 0.75


def test_old_requests_leave_the_window() -> None:
    window = SloWindow(ttft_ms=100, tpot_ms=10, window_s=10)
    window.record(0.0, ttft_s=1.0, tpot_s=1.0)
    window.record(8.0, ttft_s=0.01, tpot_s=0.001)
    assert window.view(9.0).finished == 2
    view = window.view(10.5)
    assert view.finished == 1 and view.attainment == 1.0


def test_router_records_count_by_outcome() -> None:
    window = SloWindow(ttft_ms=100, tpot_ms=10, window_s=30)
    window.observe("length", arrival=0.0, first_token=0.05, finished=0.5, output_tokens=51)
    window.observe("stop", arrival=0.0, first_token=0.5, finished=0.5, output_tokens=1)
    window.observe("error", arrival=0.0, first_token=None, finished=1.0, output_tokens=0)
    window.observe("timeout", arrival=0.0, first_token=0.01, finished=9.0, output_tokens=3)
    window.observe("abort", arrival=0.0, first_token=None, finished=1.0, output_tokens=0)
    view = window.view(2.0)
    assert (view.finished, view.failed) == (4, 2)  # the client's abort counts for nothing
    assert view.ttft_attainment == 0.25 and view.tpot_attainment == 0.5
    assert SloView.from_dict(view.to_dict()) == view
