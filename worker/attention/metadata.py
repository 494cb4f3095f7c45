"""Per-step tensors built from the scheduler's chunks: model inputs and attention metadata.

Every integer the step needs is packed into one buffer and copied to the device in one transfer
(worker/attention/packing.py). Built once per step and shared by all layers.

Cache addressing: a layer tensor `[num_blocks, 2, block_size, kvh, hd]` viewed as rows
`[num_blocks * 2 * block_size, kvh, hd]` holds position p of a request in row
`block * 2 * block_size + p % block_size` (its K) and `block_size` rows later (its V), where
`block = block_ids[p // block_size]`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.batch import ScheduledChunk
from worker.attention.block_tables import BlockTables, tables_for
from worker.attention.packing import IntPacker, pack_tokens, table_width


@dataclass
class DecodeGroup:
    """The single-token chunks of the step (decode steps), attended as one padded batch."""

    num_seqs: int
    # Rows of these tokens in the flat batch; None when they are rows 0 .. num_seqs - 1.
    token_index: torch.Tensor | None
    # [num_seqs * blocks_per_seq] block tables, flattened; entries past a length are masked out.
    block_ids: torch.Tensor
    blocks_per_seq: int
    # [num_seqs, 1, 1, blocks_per_seq * block_size] bool, True where the key is attended.
    mask: torch.Tensor


@dataclass
class PrefillSeq:
    """One chunk of several tokens, attended on its own."""

    token_start: int  # first row of the chunk in the flat batch
    num_tokens: int
    start_pos: int
    # Blocks holding positions 0 .. end - 1, when keys come from the cache (a prefix precedes the
    # chunk); None when the chunk is the whole context and its fresh K/V are used directly.
    block_ids: torch.Tensor | None
    # [num_tokens, num_keys] bool, True where attended; None means plain causal.
    mask: torch.Tensor | None

    @property
    def end_pos(self) -> int:
        return self.start_pos + self.num_tokens


@dataclass
class AttentionMetadata:
    num_tokens: int
    block_size: int
    k_rows: torch.Tensor  # [T] cache row of each new token's K
    v_rows: torch.Tensor  # [T] ... and of its V
    decode: DecodeGroup | None
    prefills: list[PrefillSeq]


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    logits_index: torch.Tensor | None  # [N] rows that sample; None when every row samples
    sample_chunks: list[int]  # index into the step's chunks of each sampled row
    attn: AttentionMetadata


def prepare_step_inputs(
    chunks: list[ScheduledChunk],
    block_size: int,
    device: torch.device,
    sliding_window: int | None,
    block_tables: BlockTables | None = None,
) -> StepInputs:
    """Build the model inputs and attention metadata for one step's chunks.

    `sliding_window` is the model's (ModelArchConfig.sliding_window): None for full attention.
    `block_tables`: the runner's tables kept on the device (see block_tables.py); None builds
    them for this step alone.
    """
    assert chunks, "empty step"
    tables = tables_for(block_tables, chunks, block_size, device)
    packer = IntPacker()
    starts = pack_tokens(packer, chunks, block_size)
    rows = tables.stage(packer, chunks)
    decode_idx = [i for i, c in enumerate(chunks) if c.num_tokens == 1]
    prefill_idx = [i for i, c in enumerate(chunks) if c.num_tokens > 1]
    decode_seqs = [chunks[i] for i in decode_idx]
    packer.add("decode_table_rows", [rows[i] for i in decode_idx])
    packer.add("decode_lens", [c.end_pos for c in decode_seqs])
    packer.add("decode_rows", [starts[i] for i in decode_idx])
    t = packer.to_device(device)
    tables.apply(t)

    blocks_per_seq = table_width(decode_seqs, block_size)
    attn = AttentionMetadata(
        num_tokens=starts[-1],
        block_size=block_size,
        k_rows=t["slots"],
        v_rows=t["slots"] + block_size,
        decode=_decode_group(t, tables, decode_idx, blocks_per_seq, block_size, sliding_window),
        prefills=[
            _prefill_seq(t, tables, rows[i], chunks, i, starts[i], sliding_window)
            for i in prefill_idx
        ],
    )
    sample_chunks = [i for i, c in enumerate(chunks) if c.sample]
    every_row_samples = len(sample_chunks) == len(chunks) == starts[-1]
    return StepInputs(
        input_ids=t["input_ids"],
        positions=t["positions"],
        logits_index=None if every_row_samples else t["logits_index"],
        sample_chunks=sample_chunks,
        attn=attn,
    )


def _decode_group(
    t: dict[str, torch.Tensor],
    tables: BlockTables,
    decode_idx: list[int],
    blocks_per_seq: int,
    block_size: int,
    sliding_window: int | None,
) -> DecodeGroup | None:
    if not decode_idx:
        return None
    num_seqs = len(decode_idx)
    lens = t["decode_lens"]
    key_pos = torch.arange(blocks_per_seq * block_size, device=lens.device)  # [L]
    mask = key_pos[None, :] < lens[:, None]  # [D, L]
    if sliding_window is not None:
        mask &= key_pos[None, :] > lens[:, None] - 1 - sliding_window
    in_order = decode_idx == list(range(num_seqs))
    return DecodeGroup(
        num_seqs=num_seqs,
        token_index=None if in_order else t["decode_rows"],
        block_ids=tables.gather(t["decode_table_rows"], blocks_per_seq).view(-1),
        blocks_per_seq=blocks_per_seq,
        mask=mask.view(num_seqs, 1, 1, -1),  # [D, 1, 1, L]
    )


def _prefill_seq(
    t: dict[str, torch.Tensor],
    tables: BlockTables,
    row: int,
    chunks: list[ScheduledChunk],
    i: int,
    token_start: int,
    sliding_window: int | None,
) -> PrefillSeq:
    c = chunks[i]
    block_size = tables.block_size
    from_cache = c.start_pos > 0
    mask = None
    if from_cache or sliding_window is not None:
        device = t["input_ids"].device
        q_pos = torch.arange(c.start_pos, c.end_pos, device=device)[:, None]  # [n, 1]
        key_pos = torch.arange(c.end_pos if from_cache else c.num_tokens, device=device)  # [S]
        key_pos = key_pos if from_cache else key_pos + c.start_pos
        mask = key_pos[None, :] <= q_pos  # [n, S]
        if sliding_window is not None:
            mask &= key_pos[None, :] > q_pos - sliding_window
    return PrefillSeq(
        token_start=token_start,
        num_tokens=c.num_tokens,
        start_pos=c.start_pos,
        block_ids=tables.tables[row, : -(-c.end_pos // block_size)] if from_cache else None,
        mask=mask,
    )
