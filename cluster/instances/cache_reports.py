"""An instance's prefix-cache reports to the routers (`PrefixCacheEvents`), for cache-aware routing.

The instance's loop calls `tick()` between steps: at most every `interval_s` it drains the block
manager's event log and sends the changes to every router it has served (learnt from the
addresses its tokens go to). A router it has not reported to yet first gets the whole cache
(`cleared` + every cached key), so a router that joins late, or one the instance lost track of,
starts from the truth. Reports are numbered per router within this incarnation (a new one for
every start), so a router can tell a restart or a lost report and forget what it knew.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Hashable, Iterable

from engine.block_manager import BlockManager
from engine.protocol.cache_events import PrefixCacheEvents

REPORT_INTERVAL_S = 0.05  # prefix-cache changes reach the routers within this (plus a step)


class CacheReporter:
    """Owned by the instance's loop thread, like the block manager it reads."""

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
