"""A discrete-event clock: callbacks run in time order, ties in the order they were scheduled."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable


class EventClock:
    def __init__(self) -> None:
        self.now = 0.0
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._cancelled: set[int] = set()
        self.events_run = 0

    def at(self, time_s: float, callback: Callable[[], None]) -> int:
        """Run `callback` at `time_s` (not before now); returns a handle for `cancel`."""
        if time_s < self.now:
            raise ValueError(f"cannot schedule at {time_s} s: the clock is at {self.now} s")
        handle = next(self._seq)
        heapq.heappush(self._queue, (time_s, handle, callback))
        return handle

    def after(self, delay_s: float, callback: Callable[[], None]) -> int:
        return self.at(self.now + max(delay_s, 0.0), callback)

    def cancel(self, handle: int) -> None:
        self._cancelled.add(handle)

    def run(self, until_s: float = float("inf")) -> None:
        """Run events up to and including `until_s`; the clock then stands at the last event
        run (or at `until_s` when events remain after it)."""
        while self._queue and self._queue[0][0] <= until_s:
            time_s, handle, callback = heapq.heappop(self._queue)
            if handle in self._cancelled:
                self._cancelled.discard(handle)
                continue
            self.now = time_s
            self.events_run += 1
            callback()
        if self._queue and until_s != float("inf"):
            self.now = max(self.now, until_s)

    @property
    def pending(self) -> int:
        return len(self._queue) - len(self._cancelled)
