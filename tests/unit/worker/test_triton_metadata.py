"""The Triton backend's per-step metadata, built on the CPU (it imports no Triton)."""

from __future__ import annotations

import torch

from engine.batch import ScheduledChunk
from engine.sampling_params import SamplingParams
from worker.attention.metadata import prepare_step_inputs
from worker.attention.triton_metadata import (
    FLASH_BUCKET,
    PREFILL_BLOCK_M,
    flash_padded_length,
    flash_plan_lengths,
    flash_prefill_chunks,
    prepare_triton_inputs,
)

BLOCK = 4
CPU = torch.device("cpu")


def chunk(rid: str, n: int, start: int, blocks: list[int], sample: bool = True) -> ScheduledChunk:
    return ScheduledChunk(rid, list(range(100, 100 + n)), start, blocks, sample, SamplingParams())


def mixed_step() -> list[ScheduledChunk]:
    return [
        chunk("dec-a", 1, 9, [7, 3, 5]),  # position 9: block 5, offset 1
        chunk(
            "pre-b",
            70,
            6,
            [2, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26],
        ),
        chunk("dec-c", 1, 2, [4]),
        chunk("pre-d", 5, 0, [1, 6], sample=False),  # a chunk that does not sample
    ]


def test_token_rows_positions_and_slots() -> None:
    chunks = mixed_step()
    inputs = prepare_triton_inputs(chunks, BLOCK, CPU, None)
    assert inputs.input_ids.tolist() == [t for c in chunks for t in c.token_ids]
    assert inputs.positions[:1].tolist() == [9] and inputs.positions[1:3].tolist() == [6, 7]
    slots = inputs.attn.slots.tolist()
    assert slots[0] == 5 * 2 * BLOCK + 1  # K row of position 9; V is BLOCK rows on
    assert slots[71] == 4 * 2 * BLOCK + 2  # dec-c, position 2 of block 4
    assert slots[72:77] == [8, 9, 10, 11, 6 * 2 * BLOCK]  # pre-d: block 1 then block 6
    # Rows that sample: the last of each sampling chunk; pre-d does not sample.
    assert inputs.logits_index.tolist() == [0, 70, 71]
    assert inputs.sample_chunks == [0, 1, 2]
    # The torch backend packs the same slots.
    torch_attn = prepare_step_inputs(chunks, BLOCK, CPU, None).attn
    assert torch_attn.k_rows.tolist() == slots
    assert (torch_attn.v_rows - torch_attn.k_rows).tolist() == [BLOCK] * len(slots)


def test_decode_and_prefill_groups() -> None:
    attn = prepare_triton_inputs(mixed_step(), BLOCK, CPU, 16).attn
    decode, prefill = attn.decode, attn.prefill
    assert decode is not None and prefill is not None and attn.sliding_window == 16
    assert decode.rows.tolist() == [0, 71] and decode.lens.tolist() == [10, 3]
    assert decode.max_len == 10
    # Tables hold the blocks up to each end, padded with block 0 to one width.
    assert decode.tables.tolist() == [[7, 3, 5], [4, 0, 0]]
    assert prefill.q_starts.tolist() == [1, 72] and prefill.q_lens.tolist() == [70, 5]
    assert prefill.ctx.tolist() == [6, 0]
    assert prefill.tables.shape == (2, 19)  # pre-b ends at 76: 19 blocks
    assert prefill.tables[1].tolist()[:3] == [1, 6, 0]
    # pre-b's 70 queries make two tiles, pre-d's 5 one.
    assert prefill.num_tiles == 3
    assert prefill.tile_seq.tolist() == [0, 0, 1]
    assert prefill.tile_start.tolist() == [0, PREFILL_BLOCK_M, 0]


def test_decode_only_step_samples_every_row() -> None:
    inputs = prepare_triton_inputs([chunk("a", 1, 3, [1]), chunk("b", 1, 0, [2])], BLOCK, CPU, None)
    assert inputs.logits_index is None  # every row samples: no gather needed
    assert inputs.attn.prefill is None and inputs.attn.decode.num_seqs == 2


def test_flash_takes_long_chunks_without_a_cached_prefix() -> None:
    """Chunks from position 0 of at least the minimum length go to FlashAttention; a chunk after
    a cached prefix (or an earlier chunk), a short one and a decode stay with the paged kernel."""
    chunks = [
        chunk("fresh-long", 9, 0, [1, 2, 3]),
        chunk("after-prefix", 9, 4, [4, 5, 6, 7]),
        chunk("dec", 1, 0, [8]),  # a one-token prompt is a decode, whatever the minimum
        chunk("fresh-short", 3, 0, [9]),
        chunk("fresh-exact", 8, 0, [10, 11]),
    ]
    assert flash_prefill_chunks(chunks, 8, None) == [0, 4]
    assert flash_prefill_chunks(chunks, 1, None) == [0, 3, 4]
    assert flash_prefill_chunks(chunks, None, None) == []  # prefill_attention: paged
    # Under a sliding window plain causal masking is exact only within the window.
    assert flash_prefill_chunks(chunks, 2, 8) == [3, 4]


def test_flash_chunks_leave_the_paged_metadata() -> None:
    chunks = [*mixed_step(), chunk("pre-e", 9, 0, [30, 31, 32])]
    attn = prepare_triton_inputs(chunks, BLOCK, CPU, None, flash_min_tokens=5).attn
    # pre-d (5 tokens from 0, rows 72..76) and pre-e (9 from 0, rows 77..85) take FlashAttention.
    assert [(f.token_start, f.num_tokens) for f in attn.flash] == [(72, 5), (77, 9)]
    prefill = attn.prefill
    assert prefill is not None and prefill.num_seqs == 1  # pre-b only: it has a prefix
    assert prefill.q_starts.tolist() == [1] and prefill.ctx.tolist() == [6]
    assert prefill.num_tiles == 2 and prefill.tables.shape == (1, 19)
    assert attn.decode is not None and attn.decode.rows.tolist() == [0, 71]
    # Every chunk's K/V is still written: the slots cover all rows.
    assert attn.slots.shape[0] == attn.num_tokens == 86
    # A step of fresh prompts only has no paged prefill at all.
    alone = prepare_triton_inputs([chunk("p", 6, 0, [1, 2])], BLOCK, CPU, None, None, 2).attn
    assert alone.prefill is None and alone.decode is None and len(alone.flash) == 1
    # The default keeps every chunk on the paged kernel.
    assert prepare_triton_inputs(chunks, BLOCK, CPU, None).attn.flash == []


def test_flash_plan_lengths_cover_every_padded_length_once() -> None:
    for low, budget in [(512, 4096), (512, 8192), (512, 1000), (300, 513), (512, 256)]:
        lengths = flash_plan_lengths(low, budget)
        assert all(low <= n <= budget for n in lengths) or not lengths
        padded = [flash_padded_length(n) for n in lengths]
        assert len(set(padded)) == len(padded)  # one prompt per plan
        reachable = {flash_padded_length(n) for n in range(low, budget + 1)}
        assert set(padded) == reachable
        assert all(p % FLASH_BUCKET == 0 for p in padded)
