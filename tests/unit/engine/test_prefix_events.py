"""The block manager's prefix-cache event log, and decode-side prefix reuse of remote KV."""

from __future__ import annotations

from engine.block_manager import BlockManager, block_hashes
from tests.unit.engine.helpers import make_request


def _cache(bm: BlockManager, rid: str, prompt: list[int]) -> list[int]:
    """Compute (pretend) and finish a request, leaving its full blocks in the prefix cache."""
    req = make_request(rid, prompt)
    bm.allocate(req, len(prompt))
    req.num_computed_tokens = len(prompt)
    bm.commit_full_blocks(req)
    ids = list(req.block_ids)
    bm.free(req)
    return ids


def test_cached_and_evicted_keys_are_logged_once() -> None:
    bm = BlockManager(4, 4)
    assert not bm.events.drain()
    _cache(bm, "a", list(range(8)))
    events = bm.events.drain()
    assert events.stored == block_hashes(list(range(8)), 4) and events.removed == []
    assert not bm.events.drain()  # drained
    _cache(bm, "b", list(range(100, 116)))  # 4 blocks: both cached blocks are evicted
    events = bm.events.drain()
    assert sorted(events.removed) == sorted(block_hashes(list(range(8)), 4))
    assert events.stored == block_hashes(list(range(100, 116)), 4)
    bm.reset_prefix_cache()
    events = bm.events.drain()
    assert events.cleared and events.stored == [] and events.removed == []
    bm.check_invariants([])


def test_the_last_change_of_a_key_wins() -> None:
    bm = BlockManager(2, 4)
    _cache(bm, "a", list(range(8)))
    _cache(bm, "b", list(range(50, 58)))  # evicts a's blocks
    _cache(bm, "c", list(range(8)))  # a's keys cached again
    events = bm.events.drain()
    a_keys, b_keys = block_hashes(list(range(8)), 4), block_hashes(list(range(50, 58)), 4)
    assert sorted(events.stored) == sorted(a_keys)
    assert sorted(events.removed) == sorted(b_keys)


def test_an_undrained_log_stays_bounded() -> None:
    bm = BlockManager(2, 4)  # the log holds at most 8 changes
    for i in range(10):
        _cache(bm, f"r{i}", list(range(i * 100, i * 100 + 8)))
    assert len(bm.events._changes) <= 8
    events = bm.events.drain()
    assert events.cleared and sorted(events.stored) == sorted(bm._cached)
    assert len(events.stored) == 2


def test_remote_allocation_reuses_a_cached_prefix() -> None:
    bm = BlockManager(16, 4)
    cached = _cache(bm, "turn1", list(range(10)))  # blocks 0-1 full and cached
    prompt = [*range(10), 77, 78, 79]  # 13 tokens: the first 8 are cached here
    block_ids, num_cached = bm.allocate_remote(prompt, len(prompt) + 1, cache_salt=None)
    assert num_cached == 2 and block_ids[:2] == cached[:2]
    assert len(block_ids) == 4 and block_ids[2:] == sorted(block_ids[2:])
    assert bm.prefix_hits == 8
    other_ids, _ = bm.allocate_remote(
        prompt, len(prompt) + 1, cache_salt=None
    )  # shared, ref-counted
    assert other_ids[:2] == block_ids[:2] and not set(other_ids[2:]) & set(block_ids[2:])
    assert bm.blocks[cached[0]].ref_count == 2
    bm.free_blocks(block_ids)
    bm.free_blocks(other_ids)
    bm.check_invariants([])
    assert bm.num_free_blocks == 16


def test_remote_allocation_matches_every_full_block() -> None:
    # Unlike a prefill, D computes no prompt token: a fully cached aligned prompt needs only
    # a fresh block for the first token.
    bm = BlockManager(8, 4)
    cached = _cache(bm, "a", list(range(8)))
    block_ids, num_cached = bm.allocate_remote(list(range(8)), 9, cache_salt=None)
    assert num_cached == 2 and block_ids[:2] == cached and len(block_ids) == 3
    bm.free_blocks(block_ids)
    bm.check_invariants([])


def test_remote_allocation_fails_cleanly_and_skips_quarantined_fresh_blocks() -> None:
    bm = BlockManager(4, 4)
    _cache(bm, "a", list(range(8)))
    assert (
        bm.allocate_remote([*range(8), 5, 5, 5, 5, 5, 5, 5, 5, 5], 18, cache_salt=None) is None
    )  # 2 + 3 > 4
    bm.check_invariants([])
    assert bm.num_free_blocks == 4
    busy = make_request("b", list(range(200, 208)))
    bm.allocate(busy, 8)  # both uncached blocks
    bm.step_launched(3)
    bm.free(busy)  # quarantined until step 3 is done
    assert (
        bm.allocate_remote([*range(8), 1, 2], 11, cache_salt=None) is None
    )  # only quarantined ones are left
    bm.step_done(3)
    block_ids, num_cached = bm.allocate_remote([*range(8), 1, 2], 11, cache_salt=None)
    assert num_cached == 2
    bm.free_blocks(block_ids)
    bm.check_invariants([])


def test_no_prefix_caching_no_reuse() -> None:
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    _cache(bm, "a", list(range(8)))
    block_ids, num_cached = bm.allocate_remote(list(range(8)), 9, cache_salt=None)
    assert num_cached == 0 and len(block_ids) == 3
    assert not bm.events.drain()
