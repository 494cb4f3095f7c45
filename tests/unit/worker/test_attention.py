"""The paged torch backend against dense attention, on random data and scattered block tables."""

from __future__ import annotations

import random

import pytest
import torch

from engine.batch import ScheduledChunk
from engine.sampling_params import SamplingParams
from worker.attention import TorchPagedAttention, make_attention_backend, prepare_step_inputs

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 6, 2, 8, 4


def _dense_reference(q, k, v, window):
    """q `[n, H, D]` at the last n positions of k/v `[S, KVH, D]` -> `[n, H * D]`."""
    n, s = q.shape[0], k.shape[0]
    q_pos = torch.arange(s - n, s)[:, None]
    k_pos = torch.arange(s)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    group = HEADS // KV_HEADS
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,shd->hns", q, k) / HEAD_DIM**0.5
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("hns,shd->nhd", probs, v).reshape(n, -1)


@pytest.mark.parametrize("window", [None, 5])
def test_mixed_batch_matches_dense_attention(window) -> None:
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    # (context before the chunk, chunk length): decodes, a fresh prefill, prefills after a prefix.
    shapes = [(9, 1), (0, 1), (22, 1), (0, 7), (5, 6), (13, 3), (3, 1)]
    free = list(range(40))
    rng.shuffle(free)
    cache = torch.zeros(40, 2, BLOCK, KV_HEADS, HEAD_DIM)
    full_k, full_v, chunks = [], [], []
    for i, (ctx, n) in enumerate(shapes):
        blocks = [free.pop() for _ in range(-(-(ctx + n) // BLOCK))]
        k = torch.randn(ctx + n, KV_HEADS, HEAD_DIM, generator=gen)
        v = torch.randn(ctx + n, KV_HEADS, HEAD_DIM, generator=gen)
        for p in range(ctx):  # the prefix is already in the cache
            cache[blocks[p // BLOCK], 0, p % BLOCK] = k[p]
            cache[blocks[p // BLOCK], 1, p % BLOCK] = v[p]
        full_k.append(k)
        full_v.append(v)
        chunks.append(ScheduledChunk(f"r{i}", [0] * n, ctx, blocks, True, SamplingParams()))
    q = torch.randn(sum(n for _, n in shapes), HEADS, HEAD_DIM, generator=gen)
    new_k = torch.cat([k[ctx:] for k, (ctx, _) in zip(full_k, shapes, strict=True)])
    new_v = torch.cat([v[ctx:] for v, (ctx, _) in zip(full_v, shapes, strict=True)])

    meta = prepare_step_inputs(chunks, BLOCK, torch.device("cpu"), window).attn
    backend = TorchPagedAttention(HEADS, KV_HEADS, HEAD_DIM)
    backend.write_kv(cache, new_k, new_v, meta)
    out = backend.attend(q, new_k, new_v, cache, meta)

    start = 0
    for k, v, (_, n) in zip(full_k, full_v, shapes, strict=True):
        expected = _dense_reference(q[start : start + n], k, v, window)
        torch.testing.assert_close(out[start : start + n], expected, atol=1e-5, rtol=1e-5)
        start += n


def test_backend_choice_and_prefill_attention_setting() -> None:
    cpu = torch.device("cpu")
    backend = make_attention_backend("auto", HEADS, KV_HEADS, HEAD_DIM, cpu, "paged", torch.float32)
    assert backend.name == "torch"  # the torch backend attends fresh chunks with SDPA anyway
    with pytest.raises(ValueError, match="prefill_attention 'flash'"):
        make_attention_backend("auto", HEADS, KV_HEADS, HEAD_DIM, cpu, "flash")
