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
from worker.attention.packing import IntPacker, pack_tokens, padded_tables


@dataclass
class DecodeGroup:
    """The single-token chunks of the step (decode steps), attended as one padded batch."""

    num_seqs: int
    # Rows of these tokens in the flat batch; None when they are rows 0 .. num_seqs - 1.
    token_index: torch.Tensor | None
    # [num_seqs * blocks_per_seq] block tables padded with block 0 (masked out), flattened.
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
) -> StepInputs:
    """Build the model inputs and attention metadata for one step's chunks.

    `sliding_window` is the model's (ModelArchConfig.sliding_window): None for full attention.
    """
    assert chunks, "empty step"
    packer = IntPacker()
    starts = pack_tokens(packer, chunks, block_size)
    decode_idx = [i for i, c in enumerate(chunks) if c.num_tokens == 1]
    prefill_idx = [i for i, c in enumerate(chunks) if c.num_tokens > 1]
    blocks_per_seq = _pack_decode(packer, chunks, decode_idx, starts, block_size)
    for i in prefill_idx:
        if chunks[i].start_pos > 0:
            num_blocks = -(-chunks[i].end_pos // block_size)
            packer.add(f"prefill{i}", chunks[i].block_ids[:num_blocks])
    t = packer.to_device(device)

    attn = AttentionMetadata(
        num_tokens=starts[-1],
        block_size=block_size,
        k_rows=t["slots"],
        v_rows=t["slots"] + block_size,
        decode=_decode_group(t, decode_idx, blocks_per_seq, block_size, sliding_window),
        prefills=[_prefill_seq(t, chunks, i, starts[i], sliding_window) for i in prefill_idx],
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


def _pack_decode(
    packer: IntPacker,
    chunks: list[ScheduledChunk],
    decode_idx: list[int],
    starts: list[int],
    block_size: int,
) -> int:
    if not decode_idx:
        return 0
    seqs = [chunks[i] for i in decode_idx]
    tables, blocks_per_seq = padded_tables(seqs, block_size)
    packer.add("decode_tables", tables)
    packer.add("decode_lens", [c.end_pos for c in seqs])
    packer.add("decode_rows", [starts[i] for i in decode_idx])
    return blocks_per_seq


def _decode_group(
    t: dict[str, torch.Tensor],
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
        block_ids=t["decode_tables"],
        blocks_per_seq=blocks_per_seq,
        mask=mask.view(num_seqs, 1, 1, -1),  # [D, 1, 1, L]
    )


def _prefill_seq(
    t: dict[str, torch.Tensor],
    chunks: list[ScheduledChunk],
    i: int,
    token_start: int,
    sliding_window: int | None,
) -> PrefillSeq:
    c = chunks[i]
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
        block_ids=t[f"prefill{i}"] if from_cache else None,
        mask=mask,
    )
