"""Cache-aware scoring and its balance guard, without Ray or sockets."""

from __future__ import annotations

import pytest

from cluster.router.routing import (
    REASON_BALANCE_GUARD,
    REASON_CACHE_HIT,
    REASON_LOAD,
    BalanceGuard,
    DecodeCandidate,
    PrefillCandidate,
    RoutingPolicy,
    prefill_hit_cap,
)


def _policy(cache_aware: bool = True, ratio: float = 2.0, slack: float = 100) -> RoutingPolicy:
    return RoutingPolicy(cache_aware, BalanceGuard(ratio, slack), BalanceGuard(ratio, 2))


def test_prefill_goes_where_the_prefix_is() -> None:
    policy = _policy()
    candidates = [PrefillCandidate("p0", 50, 0), PrefillCandidate("p1", 80, 960)]
    decision = policy.choose_prefill(candidates, prompt_len=1000)
    assert decision.name == "p1" and decision.reason == REASON_CACHE_HIT
    assert decision.cached_tokens == 960


def test_prefill_cost_is_queue_plus_uncached_tokens() -> None:
    policy = _policy(slack=10_000)
    # p1 holds 500 tokens but is 600 tokens busier: p0 finishes this prompt sooner.
    candidates = [PrefillCandidate("p0", 0, 0), PrefillCandidate("p1", 600, 500)]
    decision = policy.choose_prefill(candidates, prompt_len=1000)
    assert decision.name == "p0" and decision.reason == REASON_LOAD


def test_load_routing_ignores_the_cache() -> None:
    policy = _policy(cache_aware=False)
    candidates = [PrefillCandidate("p0", 10, 0), PrefillCandidate("p1", 80, 960)]
    assert policy.choose_prefill(candidates, 1000) == policy.choose_prefill(candidates, 5)
    assert policy.choose_prefill(candidates, 1000).name == "p0"


def test_balance_guard_excludes_the_hot_holder() -> None:
    policy = _policy(ratio=2.0, slack=100)
    candidates = [PrefillCandidate("p0", 50, 0), PrefillCandidate("p1", 201, 4000)]
    decision = policy.choose_prefill(candidates, prompt_len=4100)
    assert decision.name == "p0" and decision.reason == REASON_BALANCE_GUARD


def test_one_hot_prefix_stays_within_the_guard() -> None:
    """Every request shares a 2000-token prefix that only p0 holds (the others never finish
    anything, the worst case); p0 is chosen only while it is within the guard."""
    guard = BalanceGuard(max_load_ratio=1.5, slack=500)
    policy = RoutingPolicy(True, guard, guard)
    load = {"p0": 0, "p1": 0, "p2": 0}
    reasons = []
    for _ in range(60):
        candidates = [PrefillCandidate(n, load[n], 2000 if n == "p0" else 0) for n in load]
        decision = policy.choose_prefill(candidates, prompt_len=2100)
        assert load[decision.name] <= guard.limit(list(load.values()))
        reasons.append(decision.reason)
        load[decision.name] += 2100 - decision.cached_tokens
    assert max(load.values()) <= guard.limit(list(load.values())) + 2100
    assert REASON_CACHE_HIT in reasons and REASON_BALANCE_GUARD in reasons
    assert min(load.values()) > 0  # traffic spread to every instance


def test_prefill_hit_cap_leaves_one_token() -> None:
    assert prefill_hit_cap(32, 16) == 16
    assert prefill_hit_cap(33, 16) == 32
    assert prefill_hit_cap(1, 16) == 0


def test_decode_prefers_most_cached_with_room() -> None:
    policy = _policy()
    candidates = [
        DecodeCandidate("d0", inflight=1, free_blocks=100, cached_tokens=0),
        DecodeCandidate("d1", inflight=2, free_blocks=100, cached_tokens=64),
        DecodeCandidate("d2", inflight=0, free_blocks=1, cached_tokens=128),  # lacks room
    ]
    decision = policy.choose_decode(candidates, blocks_needed=10, block_size=16)
    assert decision.name == "d1" and decision.reason == REASON_CACHE_HIT


def test_decode_room_counts_the_blocks_it_holds() -> None:
    policy = _policy()
    candidates = [
        DecodeCandidate("d0", inflight=0, free_blocks=100),
        DecodeCandidate("d1", inflight=0, free_blocks=2, cached_tokens=128),  # lacks only 2
    ]
    assert policy.choose_decode(candidates, blocks_needed=10, block_size=16).name == "d1"


@pytest.mark.parametrize("cache_aware", [True, False])
def test_decode_without_hits_is_least_busy(cache_aware: bool) -> None:
    policy = _policy(cache_aware)
    candidates = [
        DecodeCandidate("d0", inflight=3, free_blocks=100),
        DecodeCandidate("d1", inflight=1, free_blocks=50),
    ]
    decision = policy.choose_decode(candidates, blocks_needed=4, block_size=16)
    assert decision.name == "d1" and decision.reason == REASON_LOAD


def test_decode_guard() -> None:
    policy = RoutingPolicy(True, BalanceGuard(1.0, 0), BalanceGuard(2.0, 2))
    candidates = [
        DecodeCandidate("d0", inflight=1, free_blocks=100),
        DecodeCandidate("d1", inflight=5, free_blocks=100, cached_tokens=512),
    ]
    decision = policy.choose_decode(candidates, blocks_needed=40, block_size=16)
    assert decision.name == "d0" and decision.reason == REASON_BALANCE_GUARD
