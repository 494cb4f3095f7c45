"""Where a request goes: pure scoring of prefill and decode instances.

`router.routing: load` picks the prefill (or mixed) instance with the fewest outstanding prefill
tokens. `cache_aware` also counts what each instance already holds: a prefill instance costs the
tokens queued on it plus the tokens of this prompt it would still have to compute, so a long
cached prefix draws the request to its holder until that holder's queue is deeper than the
prefix is long. The decode instance is chosen for the most cached prefix blocks (those need not
move), among the ones with room.

The balance guard keeps one hot prefix from pinning all traffic on one instance: an instance
whose load exceeds the least loaded one's by more than `max_load_ratio` x + `slack` is not
eligible, whatever it holds. Every decision carries a reason for the metrics:
`load` (nothing cached anywhere that mattered, or load routing), `cache_hit` (chosen for what it
holds) and `balance_guard` (the instance holding the most was over the guard).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

REASON_LOAD = "load"
REASON_CACHE_HIT = "cache_hit"
REASON_BALANCE_GUARD = "balance_guard"
REASONS = (REASON_LOAD, REASON_CACHE_HIT, REASON_BALANCE_GUARD)


@dataclass(frozen=True)
class BalanceGuard:
    """Eligible: load <= max_load_ratio * least load + slack."""

    max_load_ratio: float
    slack: float

    def limit(self, loads: Sequence[float]) -> float:
        return self.max_load_ratio * min(loads) + self.slack


@dataclass(frozen=True)
class PrefillCandidate:
    name: str
    outstanding_tokens: int  # prompt tokens sent to it whose first token has not come back
    cached_tokens: int = 0  # leading tokens of this prompt it holds in its prefix cache


@dataclass(frozen=True)
class DecodeCandidate:
    name: str
    inflight: int  # requests the router has sent its way that have not finished
    free_blocks: int  # as it last reported
    cached_tokens: int = 0


@dataclass(frozen=True)
class Decision:
    name: str
    reason: str
    cached_tokens: int  # what the index expects the chosen instance to hold


def prefill_hit_cap(prompt_len: int, block_size: int) -> int:
    """Prefix tokens a prefill can reuse: whole blocks, and at least one token left to compute
    (the last position's logits are needed), as `BlockManager.match_prefix` does."""
    return max(prompt_len - 1, 0) // block_size * block_size


class RoutingPolicy:
    """Stateless scoring apart from a rotation that spreads exact ties."""

    def __init__(self, cache_aware: bool, prefill_guard: BalanceGuard, decode_guard: BalanceGuard):
        self.cache_aware = cache_aware
        self.prefill_guard = prefill_guard
        self.decode_guard = decode_guard
        self._rotation = itertools.count()

    def _rotated(self, items: Sequence) -> list:
        start = next(self._rotation) % len(items)
        return [*items[start:], *items[:start]]

    def choose_prefill(self, candidates: Sequence[PrefillCandidate], prompt_len: int) -> Decision:
        """The instance with the least prefill work once this prompt is queued on it."""
        assert candidates, "no candidates"
        ordered = self._rotated(candidates)
        by_load = min(ordered, key=lambda c: c.outstanding_tokens)
        if not self.cache_aware or not any(c.cached_tokens for c in ordered):
            return Decision(by_load.name, REASON_LOAD, by_load.cached_tokens)
        limit = self.prefill_guard.limit([c.outstanding_tokens for c in ordered])
        eligible = [c for c in ordered if c.outstanding_tokens <= limit]
        best = min(eligible, key=lambda c: c.outstanding_tokens + prompt_len - c.cached_tokens)
        holder = max(ordered, key=lambda c: c.cached_tokens)
        reason = _reason(best.cached_tokens, holder.cached_tokens, holder in eligible)
        return Decision(best.name, reason, best.cached_tokens)

    def choose_decode(
        self, candidates: Sequence[DecodeCandidate], blocks_needed: int, block_size: int
    ) -> Decision:
        """The instance with room that holds most of the prompt (least KV to move), then the
        least busy. Instances without room for the blocks they lack are tried only when none
        has room (their own allocation then decides)."""
        assert candidates, "no candidates"
        ordered = self._rotated(candidates)

        def lacks(c: DecodeCandidate) -> int:
            return blocks_needed - c.cached_tokens // block_size

        roomy = [c for c in ordered if c.free_blocks >= lacks(c)] or ordered
        by_load = min(roomy, key=lambda c: (c.inflight, -c.free_blocks))
        if not self.cache_aware or not any(c.cached_tokens for c in roomy):
            return Decision(by_load.name, REASON_LOAD, by_load.cached_tokens)
        limit = self.decode_guard.limit([c.inflight for c in roomy])
        eligible = [c for c in roomy if c.inflight <= limit]
        best = min(eligible, key=lambda c: (-c.cached_tokens, c.inflight, -c.free_blocks))
        holder = max(roomy, key=lambda c: c.cached_tokens)
        reason = _reason(best.cached_tokens, holder.cached_tokens, holder in eligible)
        return Decision(best.name, reason, best.cached_tokens)


def _reason(chosen_cached: int, most_cached: int, holder_eligible: bool) -> str:
    if not holder_eligible and chosen_cached < most_cached:
        return REASON_BALANCE_GUARD
    return REASON_CACHE_HIT if chosen_cached else REASON_LOAD
