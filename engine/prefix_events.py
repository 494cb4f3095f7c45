"""What entered and left a block manager's prefix cache since it was last asked.

The block manager records every key it publishes (a full block becomes findable) and every key
it forgets (the block is evicted for new content, or the cache is reset). An instance's
`CacheReporter` drains the log now and then and sends it to the routers
(`engine.protocol.cache_events`). A key's last
change wins, so a drained batch holds each key once and its order does not matter.

Memory is bounded even if nobody drains: past `limit` pending changes the log collapses to
"everything was cleared; here is what is cached now", which the block manager can always list.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.protocol.cache_events import PrefixCacheEvents

if TYPE_CHECKING:  # the block manager imports this module
    from engine.block_manager import BlockManager


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


REPORT_INTERVAL_S = 0.05  # prefix-cache changes reach the routers within this (plus a step)


class CacheReporter:
    """An instance's prefix-cache reports to the routers, for cache-aware routing; owned by the
    instance's loop thread, like the block manager it reads.

    `tick()` runs between steps: at most every `interval_s` it drains the block manager's log and
    sends the changes to every router the instance has served (learnt from the addresses its
    tokens go to). A router not reported to yet first gets the whole cache (`cleared` + every
    cached key), so a router that joins late, or one the instance lost track of, starts from the
    truth. Reports are numbered per router within this incarnation (a new one for every start),
    so a router can tell a restart or a lost report and forget what it knew."""

    def __init__(
        self,
        name: Hashable,
        blocks: BlockManager,
        send: Callable[[str, PrefixCacheEvents], bool],
        interval_s: float = REPORT_INTERVAL_S,
    ) -> None:
        self.name = name
        self.incarnation = uuid.uuid4().hex
        self._blocks = blocks
        self._send = send  # False when the message could not be sent
        self._interval_s = interval_s
        self._next_seq: dict[str, int] = {}  # router inbox -> its next report number
        self._last = 0.0
        self.reports = 0

    def add_routers(self, addresses: Iterable[str]) -> None:
        """Routers this instance sends tokens to; new ones get the whole cache next tick."""
        for address in addresses:
            self._next_seq.setdefault(address, 0)

    def tick(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if now - self._last < self._interval_s:
            return
        self._last = now
        events = self._blocks.events.drain()
        for address, seq in list(self._next_seq.items()):
            if seq == 0:  # first contact: everything cached now (the drained changes included)
                report = self._report(seq, list(self._blocks.cached_keys()), [], cleared=True)
            elif events:
                report = self._report(seq, events.stored, events.removed, events.cleared)
            else:
                continue
            if self._send(address, report):
                self._next_seq[address] = seq + 1
                self.reports += 1
            else:  # gone or stalled: start over with the whole cache if it comes back
                del self._next_seq[address]

    def _report(self, seq: int, stored: list, removed: list, cleared: bool) -> PrefixCacheEvents:
        blocks = self._blocks
        return PrefixCacheEvents(
            instance=self.name,
            incarnation=self.incarnation,
            seq=seq,
            block_size=blocks.block_size,
            num_blocks=blocks.num_blocks,
            free_blocks=blocks.num_free_blocks,
            stored=stored,
            removed=removed,
            cleared=cleared,
        )
