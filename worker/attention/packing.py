"""Packing a step's integers into one host buffer, moved to the device in one transfer.

Both attention backends build their per-step metadata this way: every integer the step needs
(token ids, positions, cache slots, block tables, ...) is appended to one Python list, turned
into one int64 tensor (pinned on CUDA, so the copy is asynchronous) and copied once; each piece
is then a view of that tensor. Each piece starts 16 bytes into the buffer's alignment (an even
index): Triton compiles a kernel variant per pointer alignment class, so unaligned views would
make new variants appear mid-serving as batch shapes shift the offsets.
"""

from __future__ import annotations

import torch

from engine.batch import ScheduledChunk

_ALIGN = 2  # int64 elements: 16 bytes


class IntPacker:
    """Collects named int lists into one buffer and remembers where each piece lies."""

    def __init__(self) -> None:
        self.values: list[int] = []
        self.spans: dict[str, tuple[int, int]] = {}

    def add(self, name: str, values: list[int]) -> None:
        if len(self.values) % _ALIGN:
            self.values.extend([0] * (_ALIGN - len(self.values) % _ALIGN))
        self.spans[name] = (len(self.values), len(self.values) + len(values))
        self.values.extend(values)

    def to_device(self, device: torch.device) -> dict[str, torch.Tensor]:
        flat = torch.tensor(self.values, dtype=torch.int64, pin_memory=device.type == "cuda")
        flat = flat.to(device, non_blocking=True)
        return {name: flat[a:b] for name, (a, b) in self.spans.items()}


def pack_tokens(packer: IntPacker, chunks: list[ScheduledChunk], block_size: int) -> list[int]:
    """Adds input_ids, positions, slots and logits_index; returns each chunk's first row.

    `slots` is the cache row of each new token's K in a layer viewed as rows
    `[num_blocks * 2 * block_size, kvh, hd]`: `block * 2 * block_size + p % block_size`, with V
    `block_size` rows later.
    """
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    logits_index: list[int] = []
    starts = [0]
    rows_per_block = 2 * block_size
    for c in chunks:
        input_ids.extend(c.token_ids)
        span = range(c.start_pos, c.end_pos)
        positions.extend(span)
        table = c.block_ids
        assert len(table) * block_size >= c.end_pos, f"{c.request_id}: block table too short"
        slots.extend(table[p // block_size] * rows_per_block + p % block_size for p in span)
        if c.sample:
            logits_index.append(len(input_ids) - 1)
        starts.append(len(input_ids))
    packer.add("input_ids", input_ids)
    packer.add("positions", positions)
    packer.add("slots", slots)
    packer.add("logits_index", logits_index)
    return starts


def table_width(seqs: list[ScheduledChunk], block_size: int) -> int:
    """Blocks of the longest of `seqs` (the width of their gathered block tables)."""
    return max((-(-c.end_pos // block_size) for c in seqs), default=0)
