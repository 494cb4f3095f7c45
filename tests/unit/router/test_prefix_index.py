"""The router's prefix index against the real block manager's keys and events."""

from __future__ import annotations

from cluster.router.prefix_index import KeyChains, PrefixIndex, request_block_keys
from engine.block_manager import BlockManager
from engine.protocol.cache_events import PrefixCacheEvents
from engine.request import Request
from engine.sampling_params import SamplingParams

BS = 4


def _report(instance: str, seq: int, stored=(), removed=(), **kw) -> PrefixCacheEvents:
    kw = {"incarnation": "a", "block_size": BS, "num_blocks": 64, "free_blocks": 64, **kw}
    return PrefixCacheEvents(instance, seq=seq, stored=list(stored), removed=list(removed), **kw)


def _cached_keys_of(manager: BlockManager, prompt: list[int]) -> list:
    """Run a prompt through a real block manager and return the keys it cached."""
    request = Request("r", prompt, SamplingParams(max_tokens=1))
    manager.allocate(request, len(prompt))
    request.num_computed_tokens = len(prompt)
    manager.commit_full_blocks(request)
    keys = [manager.blocks[b].block_hash for b in request.block_ids]
    manager.free(request)
    return [k for k in keys if k is not None]


def test_router_keys_equal_the_block_managers() -> None:
    prompt = list(range(100, 118))  # 4 full blocks and 2 tokens
    keys = _cached_keys_of(BlockManager(16, BS), prompt)
    assert request_block_keys(prompt, BS) == keys
    assert len(keys) == 4


def test_matched_blocks_count_the_leading_run_only() -> None:
    prompt = list(range(20))
    chain = request_block_keys(prompt, BS)
    index = PrefixIndex(max_blocks=100)
    index.apply(_report("p0", 0, stored=[chain[0], chain[1], chain[3]]))
    chains = KeyChains(prompt)
    assert index.cached_tokens("p0", chains) == 2 * BS  # block 2 is missing
    assert index.cached_tokens("p1", chains) == 0  # never reported
    other = [7, *prompt[1:]]  # a different first token changes every key after it
    assert index.cached_tokens("p0", KeyChains(other)) == 0


def test_eviction_events_remove_keys() -> None:
    prompt = list(range(12))
    chain = request_block_keys(prompt, BS)
    index = PrefixIndex(max_blocks=100)
    index.apply(_report("d0", 0, stored=chain))
    assert index.cached_tokens("d0", KeyChains(prompt)) == 12
    index.apply(_report("d0", 1, removed=[chain[1]]))
    assert index.cached_tokens("d0", KeyChains(prompt)) == BS
    index.apply(_report("d0", 2, cleared=True))
    assert index.cached_tokens("d0", KeyChains(prompt)) == 0


def test_restart_gap_and_death_forget_the_instance() -> None:
    prompt = list(range(8))
    chain = request_block_keys(prompt, BS)
    index = PrefixIndex(max_blocks=100)
    index.apply(_report("p0", 0, stored=chain))
    index.apply(_report("p0", 0, incarnation="b"))  # restarted: its cache is empty
    assert index.cached_tokens("p0", KeyChains(prompt)) == 0
    index.apply(_report("p0", 1, incarnation="b", stored=chain))
    index.apply(_report("p0", 3, incarnation="b", stored=[]))  # report 2 was lost
    assert index.cached_tokens("p0", KeyChains(prompt)) == 0
    assert index.counters["resyncs"] == 1
    index.apply(_report("p0", 4, incarnation="b", stored=chain))
    assert index.cached_tokens("p0", KeyChains(prompt)) == 8
    index.drop("p0")
    assert index.get("p0") is None


def test_memory_is_bounded_oldest_first() -> None:
    index = PrefixIndex(max_blocks=3)
    index.apply(_report("p0", 0, stored=[1, 2, 3, 4]))
    assert list(index.get("p0").keys) == [2, 3, 4]
    index.apply(_report("p0", 1, stored=[2, 5]))  # 2 re-stored: now the newest
    assert list(index.get("p0").keys) == [4, 2, 5]
    index.apply(_report("p1", 0, stored=[1, 2, 3], num_blocks=2))  # never more than its blocks
    assert list(index.get("p1").keys) == [2, 3]
    assert index.counters["dropped_keys"] == 3


def test_block_size_per_instance() -> None:
    prompt = list(range(32))
    index = PrefixIndex(max_blocks=100)
    index.apply(_report("m0", 0, stored=request_block_keys(prompt, 8), block_size=8))
    index.apply(_report("p0", 0, stored=request_block_keys(prompt, BS)[:3]))
    chains = KeyChains(prompt)
    assert index.cached_tokens("m0", chains) == 32
    assert index.cached_tokens("p0", chains) == 12
