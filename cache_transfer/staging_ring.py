"""The staging ring of cache_transfer/staging.py: first-in-first-out slots of one buffer."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

ALIGN = 256  # slot and per-rank offsets, so gathers write aligned memory


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


@dataclass
class Slot:
    offset: int
    nbytes: int
    done: bool = False


class StagingRing:
    """Slots of a `capacity`-byte buffer handed out first in, first out: slots may finish in any
    order, their space comes back in the order they were taken."""

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"staging capacity must be positive, got {capacity}")
        self.capacity = capacity
        self._slots: deque[Slot] = deque()

    def alloc(self, nbytes: int) -> Slot | None:
        """A slot of `nbytes` (<= capacity), or None while earlier slots hold the space."""
        if not 0 < nbytes <= self.capacity:
            raise ValueError(f"a {nbytes}-byte slot in a {self.capacity}-byte ring")
        while self._slots and self._slots[0].done:
            self._slots.popleft()
        start = self._free_start(nbytes)
        if start is None:
            return None
        slot = Slot(start, nbytes)
        self._slots.append(slot)
        return slot

    @property
    def live(self) -> int:
        """Slots not yet given back (finished ones behind an unfinished one included)."""
        return len(self._slots)

    def _free_start(self, nbytes: int) -> int | None:
        if not self._slots:
            return 0
        head, newest = self._slots[0].offset, self._slots[-1]
        tail = aligned(newest.offset + newest.nbytes)
        if newest.offset >= head:  # not wrapped: free are [tail, capacity) and [0, head)
            if tail + nbytes <= self.capacity:
                return tail
            return 0 if nbytes <= head else None
        return tail if tail + nbytes <= head else None  # wrapped: free is [tail, head)
