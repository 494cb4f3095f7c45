from __future__ import annotations

import pytest

from engine.block_manager import BlockManager, NoFreeBlocksError
from engine.prefix_keys import prefix_keys
from tests.unit.engine.helpers import make_request


def test_block_keys_chain_on_prefix() -> None:
    a = prefix_keys([1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    b = prefix_keys([1, 2, 3, 4, 5, 6, 7, 0], 4)
    c = prefix_keys([0, 2, 3, 4, 5, 6, 7, 8], 4)
    assert len(a) == 2  # the partial tail block has no hash
    assert a[0] == b[0] and a[1] != b[1]
    assert c[1] != a[1]  # same second block, different prefix -> different hash


def test_allocate_and_free_returns_every_block() -> None:
    bm = BlockManager(8, 4)
    req = make_request("a", list(range(10)))
    bm.allocate(req, 10)
    assert len(req.block_ids) == 3 and bm.num_free_blocks == 5
    bm.check_invariants([req])
    bm.free(req)
    assert bm.num_free_blocks == 8 and req.block_ids == []
    bm.check_invariants([])


def test_prefix_hit_shares_blocks_and_skips_computation() -> None:
    bm = BlockManager(16, 4)
    first = make_request("a", list(range(13)))
    bm.allocate(first, 13)
    first.num_computed_tokens = 13
    bm.commit_full_blocks(first)
    second = make_request("b", [*list(range(12)), 99, 98])
    bm.allocate(second, 14)
    assert second.block_ids[:3] == first.block_ids[:3]
    assert second.num_computed_tokens == 12 and second.num_cached_tokens == 12
    assert bm.blocks[first.block_ids[0]].ref_count == 2
    bm.check_invariants([first, second])
    bm.free(first)
    bm.free(second)
    bm.check_invariants([])
    assert bm.num_free_blocks == 16


def test_fully_cached_prompt_leaves_last_token_to_compute() -> None:
    bm = BlockManager(16, 4)
    first = make_request("a", list(range(8)))
    bm.allocate(first, 8)
    first.num_computed_tokens = 8
    bm.commit_full_blocks(first)
    bm.free(first)
    again = make_request("b", list(range(8)))
    bm.allocate(again, 8)
    assert again.num_computed_tokens == 4  # the second block is recomputed for its logits
    bm.free(again)
    bm.check_invariants([])


def test_cached_free_blocks_are_evicted_lru_and_uncached_first() -> None:
    bm = BlockManager(4, 2)
    old = make_request("old", [1, 2, 3, 4])
    bm.allocate(old, 4)
    old.num_computed_tokens = 4
    bm.commit_full_blocks(old)
    old_blocks = list(old.block_ids)
    bm.free(old)  # two cached free blocks
    fresh = make_request("fresh", [7, 8, 9])
    bm.allocate(fresh, 3)  # needs 2 blocks: the 2 uncached ones go first
    assert set(fresh.block_ids).isdisjoint(old_blocks)
    assert len(bm.match_prefix([1, 2, 3, 4, 5])) == 2
    more = make_request("more", [5, 6])
    bm.allocate(more, 2)  # must evict; the least recently freed is old's tail block
    assert more.block_ids[0] == old_blocks[1]
    assert len(bm.match_prefix([1, 2, 3, 4, 5])) == 1
    bm.check_invariants([fresh, more])


def test_over_allocation_raises_and_prefix_cache_off() -> None:
    bm = BlockManager(2, 4, enable_prefix_caching=False)
    req = make_request("a", list(range(12)))
    assert not bm.can_allocate(req, 12)
    with pytest.raises(NoFreeBlocksError):
        bm.allocate(req, 12)
    assert bm.match_prefix(list(range(12))) == []
    bm.check_invariants([])


def test_double_free_is_caught() -> None:
    bm = BlockManager(4, 4)
    ids = bm.allocate_blocks(2)
    assert ids is not None
    bm.free_blocks(ids)
    with pytest.raises(AssertionError):
        bm.free_blocks(ids)


def test_blocks_freed_while_a_step_runs_are_not_given_to_remote_writers() -> None:
    bm = BlockManager(4, 4)
    req = make_request("a", list(range(1, 9)))
    bm.allocate(req, 8)
    held = list(req.block_ids)
    bm.step_launched(7)  # a step using req's blocks is on the device
    bm.free(req)  # e.g. the request finished (or was aborted) while the step runs
    assert bm.num_free_blocks == 4 and bm.num_quarantined == 2
    bm.check_invariants([])
    assert bm.allocate_blocks(3) is None  # NIXL must not write where the step still may
    remote = bm.allocate_blocks(2)
    assert remote is not None and not set(remote) & set(held)
    bm.free_blocks(remote)
    bm.step_done(7)
    assert bm.num_quarantined == 0
    fresh = bm.allocate_blocks(4)
    assert fresh is not None and set(held) <= set(fresh)
    bm.free_blocks(fresh)
    bm.check_invariants([])


def test_compute_may_reuse_quarantined_blocks_at_once() -> None:
    # Later steps run after the one in flight on the device, so the scheduler's own
    # allocations need not wait (waiting would stall preemption under the overlap schedule).
    bm = BlockManager(2, 4)
    first = make_request("a", list(range(1, 9)))
    bm.allocate(first, 8)
    bm.step_launched(1)
    bm.free(first)
    second = make_request("b", list(range(11, 19)))
    assert bm.can_allocate(second, 8)
    bm.allocate(second, 8)
    assert bm.num_quarantined == 0
    bm.check_invariants([second])


def test_allocations_are_ascending_so_transfers_coalesce() -> None:
    """Cached blocks are freed tail first (evicted first); the next request must still get
    consecutive ascending ids, or every block becomes its own transfer descriptor."""
    bm = BlockManager(8, 4)
    first = make_request("a", list(range(32)))
    bm.allocate(first, 32)
    first.num_computed_tokens = 32
    bm.commit_full_blocks(first)  # hashed: freed to the eviction end, last block first
    bm.free(first)
    second = make_request("b", [9] * 24)
    bm.allocate(second, 24)
    assert second.block_ids == sorted(second.block_ids)
    assert second.block_ids == list(range(second.block_ids[0], second.block_ids[0] + 6))
    remote = bm.allocate_blocks(2)
    assert remote == sorted(remote)
    bm.free_blocks(remote)
    bm.check_invariants([second])
