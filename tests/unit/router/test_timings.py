"""The server-side TTFT split: consecutive phases, and the transfer in three parts."""

from __future__ import annotations

import pytest

from cluster.router.timings import PHASES, TimingSplit, phase_durations
from engine.protocol.tokens import Timings

STAMP_VALUES = {
    "arrival": 100.0,
    "prepared": 100.010,
    "prefill_start": 100.012,
    "prefill_end": 100.112,
    "kv_signalled": 100.113,
    "writes_done": 100.1135,
    "kv_complete": 100.114,
    "first_decode_step": 100.121,
}
STAMPS = Timings(**STAMP_VALUES)


def test_phases_add_up_to_the_first_decode_step() -> None:
    durations = phase_durations(STAMPS)
    main = sum(durations[name] for name, _, _ in PHASES)
    assert main == pytest.approx(STAMPS.first_decode_step - STAMPS.arrival)
    parts = durations["transfer_signals"] + durations["transfer_writes"]
    assert parts + durations["transfer_notify"] == pytest.approx(durations["transfer"])
    assert durations["transfer_writes"] == pytest.approx(0.0005)


def test_missing_stamps_leave_their_phases_out() -> None:
    # A request that finished on P has no transfer stamps at all.
    stamps = Timings(arrival=100.0, prepared=100.010, prefill_end=100.112)
    assert set(phase_durations(stamps)) == {"prepare"}


def test_summary_in_milliseconds() -> None:
    split = TimingSplit(keep=2)
    for shift in (0.0, 1.0, 2.0):  # the first falls out of the window of two
        split.record(Timings(**{k: v + shift for k, v in STAMP_VALUES.items()}))
    summary = split.summary()
    assert summary["prefill"]["count"] == 2
    assert summary["prefill"]["p50_ms"] == pytest.approx(100.0)
    assert summary["transfer_notify"]["mean_ms"] == pytest.approx(0.5)
