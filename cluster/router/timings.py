"""Server-side split of TTFT: where a request's time went before its first decode token.

Instances stamp wall-clock times into the TokenItems they send (P: arrival, prepared,
prefill_start, prefill_end; the messager, through D: kv_signalled, writes_done; D: kv_complete,
first_decode_step). The router turns each finished request's stamps into phase durations and
keeps the most recent ones for stats and metrics.
"""

from __future__ import annotations

import statistics
from collections import deque

from engine.protocol.tokens import Timings

# (phase, from stamp, to stamp): consecutive intervals, so they add up to the first decode step.
PHASES = (
    ("prepare", "arrival", "prepared"),  # P's blocks + D's allocation (the prepare pool)
    ("prefill_queue", "prepared", "prefill_start"),
    ("prefill", "prefill_start", "prefill_end"),
    ("transfer", "prefill_end", "kv_complete"),  # KV on D after the first token was sampled
    ("first_decode_step", "kv_complete", "first_decode_step"),
)
# The transfer phase in three consecutive parts, stamped by the cache messager: until it had the
# last layer's signal and the first token (P's signal line), until every write was DONE (the
# copy still behind), and until D's control thread took the KvComplete message.
TRANSFER_PARTS = (
    ("transfer_signals", "prefill_end", "kv_signalled"),
    ("transfer_writes", "kv_signalled", "writes_done"),
    ("transfer_notify", "writes_done", "kv_complete"),
)


def phase_durations(stamps: Timings) -> dict[str, float]:
    """Durations in seconds of the phases whose two stamps are both present."""
    out = {}
    for name, start, end in PHASES + TRANSFER_PARTS:
        begin, finish = getattr(stamps, start), getattr(stamps, end)
        if begin is not None and finish is not None:
            out[name] = finish - begin
    return out


class TimingSplit:
    """The last `keep` requests' phase durations, summarized on demand."""

    def __init__(self, keep: int = 2048) -> None:
        self._samples: deque[dict[str, float]] = deque(maxlen=keep)

    def record(self, stamps: Timings) -> dict[str, float]:
        durations = phase_durations(stamps)
        if durations:
            self._samples.append(durations)
        return durations

    def clear(self) -> None:
        self._samples.clear()

    def summary(self) -> dict[str, dict[str, float]]:
        """Per phase: count, mean and median in milliseconds."""
        out = {}
        for name, _, _ in PHASES + TRANSFER_PARTS:
            values = [s[name] * 1000 for s in self._samples if name in s]
            if values:
                out[name] = {
                    "count": len(values),
                    "mean_ms": statistics.fmean(values),
                    "p50_ms": statistics.median(values),
                }
        return out
