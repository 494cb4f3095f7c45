"""What entered and left a block manager's prefix cache since it was last asked.

The block manager records every key it publishes (a full block becomes findable) and every key
it forgets (the block is evicted for new content, or the cache is reset). The instance drains the
log now and then and sends it to the routers (`engine.protocol.cache_events`). A key's last
change wins, so a drained batch holds each key once and its order does not matter.

Memory is bounded even if nobody drains: past `limit` pending changes the log collapses to
"everything was cleared; here is what is cached now", which the block manager can always list.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field


@dataclass
class DrainedEvents:
    stored: list[Hashable] = field(default_factory=list)
    removed: list[Hashable] = field(default_factory=list)
    cleared: bool = False  # apply before `stored`: every earlier key is gone

    def __bool__(self) -> bool:
        return bool(self.stored or self.removed or self.cleared)


class PrefixEventLog:
    def __init__(self, limit: int, cached_keys: Callable[[], Iterable[Hashable]]) -> None:
        self._limit = max(limit, 1)
        self._cached_keys = cached_keys  # every key cached right now, for an overflow
        self._changes: dict[Hashable, bool] = {}  # key -> stored (True) or removed (False)
        self._cleared = False
        self._overflowed = False

    def stored(self, key: Hashable) -> None:
        self._note(key, True)

    def removed(self, key: Hashable) -> None:
        self._note(key, False)

    def cleared(self) -> None:
        self._changes.clear()
        self._cleared = True
        self._overflowed = False

    def _note(self, key: Hashable, stored: bool) -> None:
        if self._overflowed:
            return  # the next drain lists the whole cache anyway
        self._changes[key] = stored
        if len(self._changes) > self._limit:
            self._changes.clear()
            self._overflowed = True

    def drain(self) -> DrainedEvents:
        if self._overflowed:
            events = DrainedEvents(stored=list(self._cached_keys()), cleared=True)
        else:
            events = DrainedEvents(
                stored=[k for k, stored in self._changes.items() if stored],
                removed=[k for k, stored in self._changes.items() if not stored],
                cleared=self._cleared,
            )
        self._changes = {}
        self._cleared = self._overflowed = False
        return events
