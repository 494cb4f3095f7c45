"""SLO attainment of the requests that finished within the last `window_s` seconds."""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class SloView:
    """Attainment over a window; 1.0 when nothing finished (no evidence of a miss)."""

    finished: int = 0
    ttft_attainment: float = 1.0
    tpot_attainment: float = 1.0
    failed: int = 0  # requests that ended with an error in the window (never met the SLO)

    @property
    def attainment(self) -> float:
        return min(self.ttft_attainment, self.tpot_attainment)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SloView:
        return cls(
            **{
                k: data[k]
                for k in ("finished", "ttft_attainment", "tpot_attainment", "failed")
                if k in data
            }
        )


class SloWindow:
    """Finished requests with whether each met the TTFT and the TPOT bound, over a time window.

    A failed request meets neither. A request with one output token has no TPOT: it counts as
    meeting that bound.
    """

    def __init__(self, ttft_ms: float, tpot_ms: float, window_s: float) -> None:
        self.ttft_s = ttft_ms / 1000.0
        self.tpot_s = tpot_ms / 1000.0
        self.window_s = window_s
        self._records: deque[tuple[float, bool, bool, bool]] = deque()  # (time, ttft, tpot, ok)

    def record(self, now: float, ttft_s: float, tpot_s: float | None) -> None:
        """A request finished at `now` with these latencies (tpot_s None: one output token)."""
        tpot_ok = tpot_s is None or tpot_s <= self.tpot_s
        self._records.append((now, ttft_s <= self.ttft_s, tpot_ok, True))

    def record_failure(self, now: float) -> None:
        """A request ended with an error at `now`: it met neither bound."""
        self._records.append((now, False, False, False))

    def observe(
        self,
        outcome: str,
        arrival: float,
        first_token: float | None,
        finished: float,
        output_tokens: int,
    ) -> None:
        """A request the router released (monotonic times). Clean finishes count by their
        latencies, errors and timeouts as misses; a client's abort counts for nothing."""
        if outcome == "abort":
            return
        if outcome not in ("stop", "length") or first_token is None:
            self.record_failure(finished)
            return
        tpot = (finished - first_token) / (output_tokens - 1) if output_tokens > 1 else None
        self.record(finished, first_token - arrival, tpot)

    def view(self, now: float) -> SloView:
        while self._records and self._records[0][0] < now - self.window_s:
            self._records.popleft()
        n = len(self._records)
        if n == 0:
            return SloView()
        return SloView(
            finished=n,
            ttft_attainment=sum(r[1] for r in self._records) / n,
            tpot_attainment=sum(r[2] for r in self._records) / n,
            failed=sum(not r[3] for r in self._records),
        )
