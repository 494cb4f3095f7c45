"""The router's prefix index: which instance holds which prefix-cache blocks.

Every instance publishes batched `PrefixCacheEvents` (block keys that entered and left its prefix
cache since its last report, with its load). The index keeps, per instance, the set of keys it
holds, and answers how many leading blocks of a request's key chain each instance has.

Keys are computed with the block manager's own key function (`engine.prefix_keys`), so the
router's chain for a prompt is exactly what the instances store. The index is a hint, never a
source of truth: each instance still matches a request against its own cache, so a stale entry
costs a recomputation, never wrong KV. That is why loss is handled by forgetting: an instance
that restarted (new incarnation), skipped a report (sequence gap) or died is dropped, and is
rebuilt from its later events. Memory is bounded: per instance at most `max_blocks` keys (and
never more than the KV blocks it reports), the oldest dropped first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from engine.prefix_keys import prefix_keys
from engine.protocol.cache_events import PrefixCacheEvents

BlockKey = Hashable


def request_block_keys(
    token_ids: Sequence[int], block_size: int, cache_salt: str | None = None
) -> list[BlockKey]:
    """The prefix-cache keys of every full block of `token_ids`, as the instances compute them."""
    return prefix_keys(token_ids, block_size, cache_salt)


@dataclass
class InstanceCache:
    """What the router knows of one instance's prefix cache."""

    incarnation: str
    block_size: int
    num_blocks: int = 0
    free_blocks: int = 0
    next_seq: int = 0
    keys: OrderedDict[BlockKey, None] = field(default_factory=OrderedDict)

    def matched_blocks(self, chain: Sequence[BlockKey]) -> int:
        """How many leading keys of `chain` this instance holds."""
        count = 0
        for key in chain:
            if key not in self.keys:
                break
            count += 1
        return count


class PrefixIndex:
    """Per-instance sets of cached block keys, fed by `PrefixCacheEvents`. Owned by one loop."""

    def __init__(self, max_blocks: int) -> None:
        if max_blocks < 1:
            raise ValueError("max_blocks must be >= 1")
        self.max_blocks = max_blocks
        self._instances: dict[Hashable, InstanceCache] = {}
        self.counters = {"reports": 0, "resyncs": 0, "dropped_keys": 0}

    def apply(self, report: PrefixCacheEvents) -> None:
        """Take one report; a new incarnation or a sequence gap first forgets the instance."""
        self.counters["reports"] += 1
        cache = self._instances.get(report.instance)
        fresh = cache is None or cache.incarnation != report.incarnation
        if not fresh and (report.seq != cache.next_seq or cache.block_size != report.block_size):
            self.counters["resyncs"] += 1
            fresh = True
        if fresh:
            cache = InstanceCache(report.incarnation, report.block_size)
            self._instances[report.instance] = cache
        cache.next_seq = report.seq + 1
        cache.num_blocks = report.num_blocks
        cache.free_blocks = report.free_blocks
        if report.cleared:
            cache.keys.clear()
        for key in report.removed:
            cache.keys.pop(key, None)
        for key in report.stored:
            cache.keys[key] = None
            cache.keys.move_to_end(key)
        self._bound(cache)

    def _bound(self, cache: InstanceCache) -> None:
        limit = min(self.max_blocks, cache.num_blocks) if cache.num_blocks else self.max_blocks
        while len(cache.keys) > limit:
            cache.keys.popitem(last=False)
            self.counters["dropped_keys"] += 1

    def drop(self, instance: Hashable) -> None:
        """Forget an instance (it died, or left the deployment)."""
        self._instances.pop(instance, None)

    def get(self, instance: Hashable) -> InstanceCache | None:
        return self._instances.get(instance)

    def cached_tokens(self, instance: Hashable, chains: KeyChains) -> int:
        """Tokens of the request's prefix that `instance` holds in whole cached blocks."""
        cache = self._instances.get(instance)
        if cache is None:
            return 0
        chain = chains.for_block_size(cache.block_size)
        return cache.matched_blocks(chain) * cache.block_size

    def stats(self) -> dict:
        return {
            **self.counters,
            "blocks": {str(name): len(c.keys) for name, c in self._instances.items()},
        }


class KeyChains:
    """A request's key chain per block size, computed at most once each (instances of different
    roles may use different block sizes; within PD they must be equal)."""

    def __init__(self, token_ids: Sequence[int], cache_salt: str | None = None) -> None:
        self.token_ids = token_ids
        self.cache_salt = cache_salt
        self._by_size: dict[int, list[BlockKey]] = {}

    def for_block_size(self, block_size: int) -> list[BlockKey]:
        chain = self._by_size.get(block_size)
        if chain is None:
            chain = request_block_keys(self.token_ids, block_size, self.cache_salt)
            self._by_size[block_size] = chain
        return chain
