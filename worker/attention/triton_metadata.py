"""Per-step tensors for the Triton backend, built from the scheduler's chunks.

Like worker/attention/metadata.py, every integer is packed into one host tensor and moved with
one transfer (worker/attention/packing.py); the pieces are views. The differences: decode
queries and prefill chunks each get their kernel's index arrays (rows, padded block tables,
lengths, query tiles) instead of masks, and a cache slot of -1 means "write nothing" (padding
rows of a CUDA-graph batch). Prefill chunks with nothing cached before them may be set apart for
FlashAttention (`flash_prefill_chunks`); the paged kernel's tiles then cover only the others.
This module imports no Triton, so the metadata is built and tested on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.batch import ScheduledChunk
from worker.attention.block_tables import BlockTables, tables_for
from worker.attention.packing import IntPacker, pack_tokens, table_width

# Query rows per prefill program; the host cuts chunks into tiles of this many queries.
PREFILL_BLOCK_M = 64
# Shortest chunk given to FlashAttention. It runs one launch per chunk (a loop over chunks, each
# a few tens of microseconds of host work per layer), while the paged kernel takes every chunk of
# the step in one launch; below ~512 tokens attention is a few percent of a prefill step, so the
# paged kernel's lower rate there costs less than the extra launches would. (One varlen call for
# all chunks would lift this; torch.nn.attention.varlen's signature changed from 2.10 to 2.12 --
# is_causal became window_size, enable_gqa appeared -- so it waits until the GPU image's torch
# has been checked.)
FLASH_MIN_TOKENS = 512

# SDPA's first pick for bf16/fp16 on Hopper is cuDNN's attention (a 4k prefill ~8% faster than
# with FlashAttention-2 on an H200), which builds a plan per sequence length: ~40 ms the first
# time a length is seen, so a fresh server's prefills ran at half speed until its prompt lengths
# repeated. Chunks are padded at the end to a multiple of FLASH_BUCKET -- exact under the causal
# mask, no real query sees a padded key -- so there are few plans, and the warm-up builds them.
FLASH_BUCKET = 256


def flash_padded_length(num_tokens: int) -> int:
    return -(-num_tokens // FLASH_BUCKET) * FLASH_BUCKET


def flash_plan_lengths(min_tokens: int, budget: int) -> list[int]:
    """A chunk length for each padded length the flash path can see (chunks of min_tokens up
    to the step budget): running one of each builds every plan."""
    first, last = flash_padded_length(min_tokens), flash_padded_length(budget)
    return [min(length, budget) for length in range(first, last + 1, FLASH_BUCKET)]


@dataclass
class TritonDecode:
    """The single-token chunks of a step."""

    num_seqs: int
    rows: torch.Tensor  # [D] row of each query in the flat batch
    tables: torch.Tensor  # [D, MB] block tables (entries past a length are stale, never read)
    lens: torch.Tensor  # [D] keys each query attends (its position + 1)
    max_len: int  # upper bound of `lens` (chooses the number of splits)


@dataclass
class TritonPrefill:
    """The chunks of several tokens of a step, cut into query tiles of PREFILL_BLOCK_M."""

    num_seqs: int
    num_tiles: int
    tile_seq: torch.Tensor  # [NT] chunk of each tile
    tile_start: torch.Tensor  # [NT] first query of the tile within its chunk
    q_starts: torch.Tensor  # [P] first row of each chunk in the flat batch
    q_lens: torch.Tensor  # [P]
    ctx: torch.Tensor  # [P] start position of each chunk (cached prefix length)
    tables: torch.Tensor  # [P, MB]


@dataclass(frozen=True)
class FlashPrefill:
    """A chunk that is its sequence's whole context so far (starts at position 0), attended by
    FlashAttention over its own fresh K/V with plain causal masking."""

    token_start: int  # first row of the chunk in the flat batch
    num_tokens: int


@dataclass
class TritonAttentionMetadata:
    num_tokens: int
    block_size: int
    slots: torch.Tensor  # [T] cache row of each new token's K (V is block_size rows on); -1 skip
    decode: TritonDecode | None
    prefill: TritonPrefill | None  # the chunks of several tokens the paged kernel attends
    sliding_window: int | None
    flash: list[FlashPrefill] = field(default_factory=list)  # the others (see FlashPrefill)


@dataclass
class TritonStepInputs:
    """Same fields as worker.attention.metadata.StepInputs, with the Triton metadata."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    logits_index: torch.Tensor | None  # [N] rows that sample; None when every row samples
    sample_chunks: list[int]
    attn: TritonAttentionMetadata


def prepare_triton_inputs(
    chunks: list[ScheduledChunk],
    block_size: int,
    device: torch.device,
    sliding_window: int | None,
    block_tables: BlockTables | None = None,
    flash_min_tokens: int | None = None,
) -> TritonStepInputs:
    """Model inputs and Triton attention metadata for one step's chunks (any mix).
    `block_tables`: the runner's tables kept on the device; None builds them for this step.
    `flash_min_tokens`: see `flash_prefill_chunks` (None: every chunk takes the paged kernel)."""
    assert chunks, "empty step"
    tables = tables_for(block_tables, chunks, block_size, device)
    packer = IntPacker()
    starts = pack_tokens(packer, chunks, block_size)
    rows = tables.stage(packer, chunks)
    decode_idx = [i for i, c in enumerate(chunks) if c.num_tokens == 1]
    flash_idx = flash_prefill_chunks(chunks, flash_min_tokens, sliding_window)
    flash_set = set(flash_idx)
    prefill_idx = [i for i, c in enumerate(chunks) if c.num_tokens > 1 and i not in flash_set]
    decode_seqs = [chunks[i] for i in decode_idx]
    prefill_seqs = [chunks[i] for i in prefill_idx]
    _pack_seqs(packer, "dec", decode_seqs, [rows[i] for i in decode_idx])
    packer.add("dec_rows", [starts[i] for i in decode_idx])
    _pack_seqs(packer, "pre", prefill_seqs, [rows[i] for i in prefill_idx])
    packer.add("pre_starts", [starts[i] for i in prefill_idx])
    tile_seq, tile_start = _prefill_tiles(prefill_seqs)
    packer.add("tile_seq", tile_seq)
    packer.add("tile_start", tile_start)
    t = packer.to_device(device)
    tables.apply(t)
    decode = None
    if decode_idx:
        decode_mb = table_width(decode_seqs, block_size)
        decode = TritonDecode(
            num_seqs=len(decode_idx),
            rows=t["dec_rows"],
            tables=tables.gather(t["dec_table_rows"], decode_mb),
            lens=t["dec_lens"],
            max_len=max(c.end_pos for c in decode_seqs),
        )
    prefill = None
    if prefill_idx:
        prefill_mb = table_width(prefill_seqs, block_size)
        prefill = TritonPrefill(
            num_seqs=len(prefill_idx),
            num_tiles=len(tile_seq),
            tile_seq=t["tile_seq"],
            tile_start=t["tile_start"],
            q_starts=t["pre_starts"],
            q_lens=t["pre_qlens"],
            ctx=t["pre_ctx"],
            tables=tables.gather(t["pre_table_rows"], prefill_mb),
        )
    flash = [FlashPrefill(starts[i], chunks[i].num_tokens) for i in flash_idx]
    attn = TritonAttentionMetadata(
        starts[-1], block_size, t["slots"], decode, prefill, sliding_window, flash
    )
    sample_chunks = [i for i, c in enumerate(chunks) if c.sample]
    every_row_samples = len(sample_chunks) == len(chunks) == starts[-1]
    return TritonStepInputs(
        input_ids=t["input_ids"],
        positions=t["positions"],
        logits_index=None if every_row_samples else t["logits_index"],
        sample_chunks=sample_chunks,
        attn=attn,
    )


def flash_prefill_chunks(
    chunks: list[ScheduledChunk], min_tokens: int | None, sliding_window: int | None
) -> list[int]:
    """Indices of the chunks FlashAttention attends: at least `min_tokens` (and 2) tokens,
    starting at position 0 (no cached prefix, no earlier chunk: the chunk's own K/V are its
    whole context) and, under a sliding window, no longer than the window (so that plain causal
    masking is exact). None for `min_tokens`: no chunk."""
    if min_tokens is None:
        return []
    least = max(min_tokens, 2)  # single-token chunks are decodes
    return [
        i
        for i, c in enumerate(chunks)
        if c.start_pos == 0
        and c.num_tokens >= least
        and (sliding_window is None or c.num_tokens <= sliding_window)
    ]


def _pack_seqs(
    packer: IntPacker, prefix: str, seqs: list[ScheduledChunk], table_rows: list[int]
) -> None:
    """Block-table rows, lengths and contexts of a group."""
    packer.add(f"{prefix}_table_rows", table_rows)
    packer.add(f"{prefix}_lens", [c.end_pos for c in seqs])
    packer.add(f"{prefix}_qlens", [c.num_tokens for c in seqs])
    packer.add(f"{prefix}_ctx", [c.start_pos for c in seqs])


def _prefill_tiles(seqs: list[ScheduledChunk]) -> tuple[list[int], list[int]]:
    tile_seq: list[int] = []
    tile_start: list[int] = []
    for i, c in enumerate(seqs):
        for m0 in range(0, c.num_tokens, PREFILL_BLOCK_M):
            tile_seq.append(i)
            tile_start.append(m0)
    return tile_seq, tile_start
