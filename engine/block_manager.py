"""Paged KV-cache block manager with prefix caching.

Blocks hold `block_size` token positions of every layer. A block that is full carries a key: a
SHA-256 digest of its tokens chained with the key of the block before it and the request's
`cache_salt` (engine/prefix_keys.py), so equal keys mean equal prefixes under the same salt, and
a crafted prompt cannot reach another request's KV. Freed blocks that carry a key stay findable
(cached) until they are evicted, least recently freed first; blocks without a key are reused
before any cached block is evicted. A request's keys are computed once per block and kept with
it (`Request.block_keys`), whether they are looked up, published or both.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass
from itertools import islice

from engine.prefix_events import PrefixEventLog
from engine.prefix_keys import BlockKey, extend_keys, prefix_keys
from engine.request import Request


def block_hashes(
    token_ids: list[int], block_size: int, cache_salt: str | None = None
) -> list[BlockKey]:
    """The prefix-cache keys of every full block of `token_ids` (engine/prefix_keys.py)."""
    return prefix_keys(token_ids, block_size, cache_salt)


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: BlockKey | None = None  # its prefix-cache key while it is cached


class NoFreeBlocksError(RuntimeError):
    """Raised when an allocation was attempted without checking capacity first."""


class BlockManager:
    """Owns every KV block of one instance. Pure Python; `check_invariants()` proves consistency."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in reuse order: uncached ones are moved to the front, cached ones appended
        # (so the least recently freed cached block is evicted first).
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        # Blocks freed while a step that uses them may still run: block id -> that step.
        self._quarantine: dict[int, int] = {}
        self._launched_step = -1
        self._done_step = -1
        self._cached: dict[BlockKey, int] = {}  # block key -> block id
        self.prefix_hits = 0  # tokens served from the prefix cache, cumulative
        self.prefix_queries = 0  # prompt tokens looked up, cumulative
        # Request id -> full blocks already committed, so a decode step publishes only the block
        # it filled instead of walking the whole chain again.
        self._committed: dict[str, int] = {}
        # Keys cached and evicted, drained by the instance for the routers' prefix index.
        self.events = PrefixEventLog(4 * num_blocks, self.cached_keys)

    # ----------------------------------------------------------------- capacity
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def cached_keys(self) -> list[BlockKey]:
        """Every key the prefix cache can serve right now."""
        return list(self._cached)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ----------------------------------------------------------------- allocation
    def match_prefix(
        self, token_ids: list[int], leave_one: bool = True, cache_salt: str | None = None
    ) -> list[int]:
        """Ids of cached blocks holding the longest prefix of `token_ids` (under `cache_salt`).

        With `leave_one` at least one token is always left to compute, so a fully cached prompt
        still produces logits for its last position (a decode instance receiving KV computes
        none of the prompt, so it matches every full block).
        """
        if not self.enable_prefix_caching:
            return []
        usable = (len(token_ids) - leave_one) // self.block_size
        return self._lookup(
            prefix_keys(token_ids[: usable * self.block_size], self.block_size, cache_salt)
        )

    def _match_request(self, request: Request) -> list[int]:
        """`match_prefix` for a request, with the keys it keeps."""
        if not self.enable_prefix_caching:
            return []
        return self._lookup(
            self._request_keys(request, (request.num_tokens - 1) // self.block_size)
        )

    def _lookup(self, keys: list[BlockKey]) -> list[int]:
        matched: list[int] = []
        for key in keys:
            block_id = self._cached.get(key)
            if block_id is None:
                break
            matched.append(block_id)
        return matched

    def _request_keys(self, request: Request, num_blocks: int) -> list[BlockKey]:
        """The keys of the request's first `num_blocks` full blocks, hashing only new ones."""
        keys, size = request.block_keys, self.block_size
        if len(keys) < num_blocks:  # hash only the blocks not keyed yet, reading only their tokens
            new_tokens = request.token_slice(len(keys) * size, num_blocks * size)
            extend_keys(keys, new_tokens, size, request.sampling_params.cache_salt)
        return keys[:num_blocks]

    def can_allocate(self, request: Request, num_tokens: int) -> bool:
        """Whether `allocate(request, num_tokens)` would succeed (prefix hits counted)."""
        matched = self._match_request(request) if not request.block_ids else []
        reusable_free = sum(1 for b in matched if self.blocks[b].ref_count == 0)
        needed = self.blocks_needed(num_tokens) - len(request.block_ids) - len(matched)
        return max(needed, 0) <= self.num_free_blocks - reusable_free

    def allocate(self, request: Request, num_tokens: int) -> None:
        """Give `request` blocks for its first `num_tokens` positions.

        On the first allocation the prefix cache is consulted: matched blocks are shared and
        `request.num_computed_tokens` jumps over them.
        """
        if not self.can_allocate(request, num_tokens):
            raise NoFreeBlocksError(f"request {request.request_id}: not enough free blocks")
        if not request.block_ids:
            matched = self._match_request(request)
            for block_id in matched:
                self._take(block_id)
            request.block_ids = list(matched)
            request.num_cached_tokens = len(matched) * self.block_size
            request.num_computed_tokens = request.num_cached_tokens
            self.prefix_queries += request.num_tokens
            self.prefix_hits += request.num_cached_tokens
        needed = self.blocks_needed(num_tokens) - len(request.block_ids)
        fresh = [self._take(self._pop_free()) for _ in range(needed)]
        request.block_ids.extend(sorted(fresh))  # see allocate_blocks

    def allocate_blocks(self, num_blocks: int) -> list[int] | None:
        """Fresh blocks with no owner request, for KV written from outside (a decode instance
        receiving remote KV): never a block a step still on the device may write."""
        return self._fresh_blocks(num_blocks, exclude=())

    def allocate_remote(
        self, token_ids: list[int], num_tokens: int, *, cache_salt: str | None
    ) -> tuple[list[int], int] | None:
        """Blocks for `num_tokens` positions of a request whose prompt KV is written from outside:
        first the cached blocks that already hold the longest prefix of `token_ids` under
        `cache_salt` (shared, ref-counted, never written: decoding writes past the prompt), then
        fresh blocks as in `allocate_blocks`. Returns (block ids, how many leading ones were
        cached), or None."""
        matched = self.match_prefix(token_ids, leave_one=False, cache_salt=cache_salt)
        fresh = self._fresh_blocks(self.blocks_needed(num_tokens) - len(matched), set(matched))
        if fresh is None:
            return None
        for block_id in matched:
            self._take(block_id)
        self.prefix_queries += len(token_ids)
        self.prefix_hits += len(matched) * self.block_size
        return matched + fresh, len(matched)

    def _fresh_blocks(self, num_blocks: int, exclude: Collection[int]) -> list[int] | None:
        # Lazily: the free list can hold tens of thousands of blocks.
        candidates = (b for b in self._free if b not in self._quarantine and b not in exclude)
        usable = list(islice(candidates, max(num_blocks, 0)))
        if len(usable) < num_blocks:
            return None
        for block_id in usable:
            self._evict(block_id)
            self._take(block_id)
        # Ascending ids: freed blocks come back in eviction order (a request's tail first), and
        # a run of consecutive ids on both sides moves as one transfer descriptor instead of one
        # per block (on an H100, 64 KiB descriptors moved 5 GB/s, one per layer 150+ GB/s).
        return sorted(usable)

    def commit_full_blocks(self, request: Request) -> None:
        """Publish the keys of the request's blocks that are now full of computed tokens."""
        if not self.enable_prefix_caching:
            return
        # Under the overlap schedule num_computed_tokens counts a position whose token is still
        # on the device: only blocks whose tokens are all known are hashed.
        known = min(request.num_computed_tokens, request.num_tokens)
        num_full = min(known // self.block_size, len(request.block_ids))
        done = self._committed.get(request.request_id, 0)
        if num_full <= done:
            return
        keys = self._request_keys(request, num_full)
        for index in range(done, num_full):
            key = keys[index]
            block = self.blocks[request.block_ids[index]]
            if block.block_hash is not None:
                continue
            if key in self._cached:
                continue  # an identical block is already cached; this copy stays private
            block.block_hash = key
            self._cached[key] = block.block_id
            self.events.stored(key)
        self._committed[request.request_id] = num_full

    def free(self, request: Request) -> None:
        """Release the request's blocks (last block first, so a prefix outlives its tail)."""
        self.free_blocks(reversed(request.block_ids))
        request.block_ids = []
        self._committed.pop(request.request_id, None)

    def free_blocks(self, block_ids) -> None:
        for block_id in block_ids:
            block = self.blocks[block_id]
            assert block.ref_count > 0, f"double free of block {block_id}"
            block.ref_count -= 1
            if block.ref_count == 0:
                self._release(block_id)
                if self._launched_step > self._done_step:
                    # A step still on the device may write this block (e.g. the extra token of
                    # a request that finished in flight). Later steps are ordered after it on
                    # the device, so compute may reuse the block at once; a writer from outside
                    # (KV arriving over NIXL) may not until that step is done.
                    self._quarantine[block_id] = self._launched_step

    def _release(self, block_id: int) -> None:
        self._free[block_id] = None
        if self.blocks[block_id].block_hash is None:
            self._free.move_to_end(block_id, last=False)

    # ----------------------------------------------------------------- steps on the device
    def step_launched(self, step_id: int) -> None:
        """A step that reads and writes the blocks it was given is now running."""
        self._launched_step = max(self._launched_step, step_id)

    def step_done(self, step_id: int) -> None:
        """Every step up to `step_id` has finished on the device: quarantined blocks are free."""
        self._done_step = max(self._done_step, step_id)
        for block_id, tag in list(self._quarantine.items()):
            if tag <= self._done_step:
                del self._quarantine[block_id]

    @property
    def num_quarantined(self) -> int:
        return len(self._quarantine)

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (e.g. after new weights are loaded)."""
        self._committed.clear()
        self.events.cleared()
        for block_hash, block_id in list(self._cached.items()):
            self.blocks[block_id].block_hash = None
            del self._cached[block_hash]
            if block_id in self._free:
                self._free.move_to_end(block_id, last=False)

    # ----------------------------------------------------------------- internals
    def _pop_free(self) -> int:
        if not self._free:
            raise NoFreeBlocksError("no free blocks")
        block_id = next(iter(self._free))
        self._evict(block_id)
        return block_id

    def _evict(self, block_id: int) -> None:
        """Its content is about to be overwritten: it no longer serves prefix hits."""
        block = self.blocks[block_id]
        if block.block_hash is not None:
            del self._cached[block.block_hash]
            self.events.removed(block.block_hash)
            block.block_hash = None

    def _take(self, block_id: int) -> int:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
            self._quarantine.pop(block_id, None)  # compute is ordered after the step in flight
        block.ref_count += 1
        return block_id

    # ----------------------------------------------------------------- checks
    def check_invariants(self, live_requests: list[Request] | None = None) -> None:
        """Assert internal consistency; with `live_requests`, also that refcounts match owners."""
        for block in self.blocks:
            assert block.ref_count >= 0, block
            assert (block.ref_count == 0) == (block.block_id in self._free), block
            if block.block_hash is not None:
                assert self._cached.get(block.block_hash) == block.block_id, block
        assert all(b in self._free for b in self._quarantine), "quarantined blocks are free ones"
        assert len(self._cached) == sum(b.block_hash is not None for b in self.blocks)
        if live_requests is not None:
            owners = [0] * self.num_blocks
            for request in live_requests:
                for block_id in request.block_ids:
                    owners[block_id] += 1
            refs = [b.ref_count for b in self.blocks]
            assert owners == refs, "block reference counts do not match live requests"
