"""Decode K/V kept contiguous between steps, so a decode step copies only the blocks that changed.

The torch backend attends a decode batch over padded, contiguous K/V `[D, L, kvh, hd]`. Gathering
them from the paged cache every step copies every sequence's whole context in every layer: on CPU
at batch 16 that is more memory traffic than the weights. This mirror keeps that copy between
steps, one row per block-table row (worker/attention/block_tables.py), and each step copies into
it only what is new: a sequence's blocks from the first one not yet complete in the mirror (in the
steady state one block per sequence, the one its new token went into); the first time a row is
seen, or after the row's request changed, all of them.

A block's contents can change only by writes at its own sequence's new positions (shared prefix
blocks are full, hence read-only): a row is trusted as long as its block-table row has not been
reset (BlockTables.generation). Attention runs over the rows 0 .. highest decode row; rows not in
the step are masked to one position and their output dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.batch import ScheduledChunk
from worker.attention.packing import IntPacker


@dataclass
class StagedPlan:
    """A plan whose integers are in the packer, before its transfer."""

    span: int
    width: int
    in_order: bool  # decode sequence d is in mirror row d


@dataclass
class MirrorPlan:
    """One step's use of the mirror, shared by all layers (tensors are packer views)."""

    mirror: DecodeMirror
    span: int  # rows attended: 0 .. span - 1
    width: int  # blocks per row attended
    src: torch.Tensor  # [C] cache block of each block copied into the mirror this step
    dst: torch.Tensor  # [C] its block slot in the mirror (row * capacity_blocks + block)
    rows: torch.Tensor | None  # [D] mirror row of each decode sequence; None: row d is d
    span_lens: torch.Tensor  # [span] context length of each attended row (0: not in the step)


class DecodeMirror:
    """Per layer a K and a V tensor `[rows, capacity_blocks, block_size * kvh * hd]`."""

    def __init__(
        self,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        num_layers: int,
        dtype: torch.dtype,
        device: torch.device,
        max_bytes: int,
    ) -> None:
        self.block_size = block_size
        self.block_numel = block_size * num_kv_heads * head_dim
        self.dtype = dtype
        self.device = device
        self.max_bytes = max_bytes  # all layers' K and V together; above it, no mirror
        self.num_layers = num_layers
        self.rows = 0
        self.capacity_blocks = 0
        self._layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # by cache data_ptr
        self._copied: dict[int, tuple[int, int]] = {}  # row -> (generation, full blocks held)

    def plan(
        self,
        packer: IntPacker,
        seqs: list[ScheduledChunk],
        rows: list[int],
        generations: list[int],
        width: int,
    ) -> StagedPlan | None:
        """Stage this step's copies (decode `seqs` in block-table `rows`) in `packer`; `bind`
        makes the plan after the packer's transfer. None when the mirror would outgrow its
        memory bound (the caller gathers as before)."""
        span = max(rows) + 1
        if not self._fits(span, width):
            return None
        bs, cap = self.block_size, self.capacity_blocks
        src: list[int] = []
        dst: list[int] = []
        span_lens = [0] * span
        for seq, row in zip(seqs, rows, strict=True):
            generation, full = self._copied.get(row, (-1, 0))
            start = full if generation == generations[row] else 0
            need = -(-seq.end_pos // bs)
            src.extend(seq.block_ids[start:need])
            dst.extend(range(row * cap + start, row * cap + need))
            self._copied[row] = (generations[row], seq.end_pos // bs)
            span_lens[row] = seq.end_pos
        packer.add("mirror_src", src)
        packer.add("mirror_dst", dst)
        packer.add("mirror_rows", rows)
        packer.add("mirror_lens", span_lens)
        return StagedPlan(span, width, in_order=rows == list(range(span)))

    def bind(self, staged: StagedPlan, t: dict[str, torch.Tensor]) -> MirrorPlan:
        return MirrorPlan(
            self,
            staged.span,
            staged.width,
            src=t["mirror_src"],
            dst=t["mirror_dst"],
            rows=None if staged.in_order else t["mirror_rows"],
            span_lens=t["mirror_lens"],
        )

    def layer(self, kv_layer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The K and V mirrors of the cache layer `kv_layer`, made on first use."""
        key = kv_layer.data_ptr()
        pair = self._layers.get(key)
        if pair is None:
            shape = (self.rows, self.capacity_blocks, self.block_numel)
            pair = tuple(torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in "kv")
            self._layers[key] = pair  # type: ignore[assignment]
        return pair  # type: ignore[return-value]

    def _fits(self, span: int, width: int) -> bool:
        """Grow to `span` rows and `width` blocks (everything copied afresh then), if the bound
        allows."""
        if span <= self.rows and width <= self.capacity_blocks:
            return True
        rows = max(span, 2 * self.rows)  # amortized growth: each growth copies all afresh
        blocks = max(width, 2 * self.capacity_blocks)
        if self._bytes(rows, blocks) > self.max_bytes:
            rows, blocks = span, width
            if self._bytes(rows, blocks) > self.max_bytes:
                self.reset()
                return False
        self.reset()
        self.rows, self.capacity_blocks = rows, blocks
        return True

    def _bytes(self, rows: int, blocks: int) -> int:
        return 2 * self.num_layers * rows * blocks * self.block_numel * self.dtype.itemsize

    def reset(self) -> None:
        """Drop the mirror (memory and what it held)."""
        self._layers.clear()
        self._copied.clear()
        self.rows = self.capacity_blocks = 0
