"""KV transfer between instances of different tensor-parallel sizes: which rank's heads go where.

Under tensor parallelism each rank's cache holds a contiguous range of the model's KV heads
(worker/distributed.py), in the usual layout `[num_blocks, 2, block_size, rank_heads, head_dim]`.
A prefill instance at TP a and a decode instance at TP b hold the same heads in different
ranks: every D rank needs, for each of its heads, the slice of each block held by some P rank.

- `route_heads` pairs P ranks with D ranks: for each D rank and each run of its heads, the one P
  rank that sends them (the first that holds them; replicated heads are sent once per D rank).
- `RankKV` is one rank's cache as a backend registers it (its regions and the heads they hold);
  an instance registers one per rank, rank order.
- `head_slice_rows` turns one pair's blocks into matched descriptor rows, offsets from the layer
  base (the same for every layer; `head_slice_descs` adds a layer's bases). When the pair holds
  the same heads (equal TP sizes, or a replicated head on both sides) a block is one region, and
  consecutive blocks merge as for a single rank. Otherwise the heads of one (K or V, token) are
  one run of `heads * head_dim` elements, strided inside the block on at least one side: 2 *
  block_size descriptors per block.

No torch, like cache_transfer/layout.py (numpy for the descriptor rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any

import numpy as np

from cache_transfer.layout import (
    Desc,
    KVLayout,
    KVRegions,
    LayoutError,
    checked_pair,
    paired_run_rows,
)


@dataclass(frozen=True)
class HeadRange:
    """Global KV heads `start .. start + count - 1`, as one rank's cache holds them."""

    start: int
    count: int

    @property
    def end(self) -> int:
        return self.start + self.count

    def overlap(self, other: HeadRange) -> HeadRange | None:
        start, end = max(self.start, other.start), min(self.end, other.end)
        return HeadRange(start, end - start) if end > start else None


@dataclass(frozen=True)
class HeadRoute:
    """P rank `src_rank` sends heads `heads` to D rank `dst_rank`."""

    src_rank: int
    dst_rank: int
    heads: HeadRange


@dataclass(frozen=True)
class RankKV:
    """One tensor-parallel rank's KV cache as a transfer backend sees it."""

    regions: KVRegions
    heads: HeadRange

    @classmethod
    def whole(cls, regions: KVRegions) -> RankKV:
        """A cache holding all of its model's KV heads (tensor-parallel size 1)."""
        return cls(regions, HeadRange(0, regions.layout.kv_heads))

    def to_wire(self) -> dict[str, Any]:
        return {"regions": self.regions.to_wire(), "heads": [self.heads.start, self.heads.count]}

    @classmethod
    def from_wire(cls, wire: Any) -> RankKV:
        try:
            start, count = wire["heads"]
            return cls(KVRegions.from_wire(wire["regions"]), HeadRange(int(start), int(count)))
        except (KeyError, TypeError, ValueError) as exc:
            raise LayoutError(f"bad rank KV wire form: {exc!r}") from None


def check_ranks(ranks: Sequence[RankKV]) -> None:
    """One instance's ranks: at least one, one memory kind, heads as their layouts say."""
    if not ranks:
        raise LayoutError("no KV ranks")
    if len({rank.regions.mem_type for rank in ranks}) != 1:
        raise LayoutError("an instance's ranks hold KV in different memory kinds")
    for rank in ranks:
        if rank.heads.count != rank.regions.layout.kv_heads or rank.heads.start < 0:
            raise LayoutError(f"heads {rank.heads} do not match layout {rank.regions.layout}")


def plan_routes(src: Sequence[RankKV], dst: Sequence[RankKV]) -> list[HeadRoute]:
    """Which source rank sends which heads to which destination rank; LayoutError when the two
    instances' caches cannot be paired (different models or block geometry)."""
    check_ranks(src)
    check_ranks(dst)
    s, d = src[0].regions.layout, dst[0].regions.layout
    if (s.block_size, s.head_dim, s.itemsize) != (d.block_size, d.head_dim, d.itemsize):
        raise LayoutError(f"block geometry differs beyond heads: {s} vs {d}")
    return route_heads([rank.heads for rank in src], [rank.heads for rank in dst])


def route_heads(src: Sequence[HeadRange], dst: Sequence[HeadRange]) -> list[HeadRoute]:
    """Every D rank's heads, each from exactly one P rank. Raises LayoutError when some head
    a D rank holds is held by no P rank (the two instances serve different models)."""
    routes: list[HeadRoute] = []
    for dst_rank, wanted in enumerate(dst):
        covered = wanted.start
        for src_rank, held in enumerate(src):
            part = held.overlap(HeadRange(covered, wanted.end - covered))
            if part is None or part.start != covered:
                continue
            routes.append(HeadRoute(src_rank, dst_rank, part))
            covered = part.end
            if covered == wanted.end:
                break
        if covered != wanted.end:
            raise LayoutError(f"no prefill rank holds KV head {covered} of decode rank {dst_rank}")
    return routes


def head_slice_descs(
    src: KVRegions,
    src_heads: HeadRange,
    src_layer: int,
    src_ids: Sequence[int],
    dst: KVRegions,
    dst_heads: HeadRange,
    dst_layer: int,
    dst_ids: Sequence[int],
    heads: HeadRange,
) -> tuple[list[Desc], list[Desc]]:
    """Matched descriptors that copy KV heads `heads` of blocks `src_ids` (a rank holding
    `src_heads`) into blocks `dst_ids` (a rank holding `dst_heads`) of the given layers."""
    src._check_layer(src_layer)
    dst._check_layer(dst_layer)
    src_off, dst_off, nbytes = head_slice_rows(
        src.layout, src_heads, src_ids, dst.layout, dst_heads, dst_ids, heads
    )
    lengths = nbytes.tolist()
    src_addrs = (src.layer_addrs[src_layer] + src_off).tolist()
    dst_addrs = (dst.layer_addrs[dst_layer] + dst_off).tolist()
    return (
        list(zip(src_addrs, lengths, repeat(src.device_id))),
        list(zip(dst_addrs, lengths, repeat(dst.device_id))),
    )


def head_slice_rows(
    src: KVLayout,
    src_heads: HeadRange,
    src_ids: Sequence[int],
    dst: KVLayout,
    dst_heads: HeadRange,
    dst_ids: Sequence[int],
    heads: HeadRange,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`head_slice_descs` as rows independent of the layer: (source offset, destination offset,
    bytes), offsets from each side's layer base; whole blocks merge into runs
    (`paired_run_rows`), head slices are one row per (block, K or V, token) in block order."""
    if (src.block_size, src.head_dim, src.itemsize) != (dst.block_size, dst.head_dim, dst.itemsize):
        raise LayoutError(f"block geometry differs beyond heads: {src} vs {dst}")
    if src.kv_heads != src_heads.count or dst.kv_heads != dst_heads.count:
        raise LayoutError("a head range does not match its layout's kv_heads")
    if src_heads.overlap(heads) != heads or dst_heads.overlap(heads) != heads:
        raise LayoutError(f"heads {heads} are not held by both sides")
    if src_heads == dst_heads == heads:  # whole blocks
        return paired_run_rows(src, src_ids, dst, dst_ids)
    s, d = checked_pair(src, src_ids, dst, dst_ids)
    row = src.head_dim * src.itemsize  # bytes of one head of one token
    slots = np.arange(2 * src.block_size, dtype=np.int64)  # (K or V, token) in block order
    src_in_block = (slots * src.kv_heads + heads.start - src_heads.start) * row
    dst_in_block = (slots * dst.kv_heads + heads.start - dst_heads.start) * row
    src_off = (s[:, None] * src.block_nbytes + src_in_block).reshape(-1)
    dst_off = (d[:, None] * dst.block_nbytes + dst_in_block).reshape(-1)
    return src_off, dst_off, np.full(src_off.size, heads.count * row, dtype=np.int64)


def check_rank_ids(
    src: list[RankKV],
    src_layer: int,
    src_ids: list[int],
    dst: list[RankKV],
    dst_layer: int,
    dst_ids: list[int],
) -> None:
    """LayoutError for ids a write cannot take, before anything is gathered or sent."""
    src[0].regions.layer_desc(src_layer)  # an instance's ranks share their layer and block counts
    dst[0].regions.layer_desc(dst_layer)
    checked_pair(src[0].regions.layout, src_ids, dst[0].regions.layout, dst_ids)
