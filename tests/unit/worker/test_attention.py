"""The paged torch backend against dense attention, on random data and scattered block tables."""

from __future__ import annotations

import random

import pytest
import torch

from engine.batch import ScheduledChunk
from engine.sampling_params import SamplingParams
from worker.attention import TorchPagedAttention, prepare_step_inputs
from worker.attention.block_tables import BlockTables
from worker.attention.decode_mirror import DecodeMirror

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


def _mirrored_tables(num_blocks: int) -> BlockTables:
    mirror = DecodeMirror(
        BLOCK, KV_HEADS, HEAD_DIM, 1, torch.float32, torch.device("cpu"), max_bytes=1 << 30
    )
    return BlockTables(BLOCK, num_blocks, torch.device("cpu"), rows=2, mirror=mirror)


@pytest.mark.parametrize("window", [None, 5])
def test_decode_mirror_across_steps_matches_dense_attention(window) -> None:
    """Requests join, leave, skip a step, prefill beside decodes, and a new request takes a
    finished one's table row and blocks: the mirror must never serve stale K/V."""
    gen = torch.Generator().manual_seed(1)
    cache = torch.zeros(24, 2, BLOCK, KV_HEADS, HEAD_DIM)
    tables = _mirrored_tables(num_blocks=24)
    backend = TorchPagedAttention(HEADS, KV_HEADS, HEAD_DIM)
    free = list(range(23, -1, -1))
    history: dict[str, tuple[list[torch.Tensor], list[torch.Tensor], list[int]]] = {}
    # Each step: (request, new tokens) in batch order; a request absent from later steps ended.
    steps = [
        [("a", 6), ("b", 3)],
        [("a", 1), ("b", 1), ("c", 9)],
        [("b", 1), ("a", 1), ("c", 1)],
        [("c", 1), ("a", 1)],  # b skips a step
        [("a", 1), ("b", 1), ("c", 1)],
        [("b", 1), ("c", 1), ("d", 5)],  # a ended: d takes its row and its blocks
        [("d", 1), ("b", 1), ("c", 1)],
        [("d", 1), ("c", 1)],
    ]
    for index, step in enumerate(steps):
        if index == 5:  # a's release, as the scheduler sends it; its blocks go back last-first
            free.extend(history.pop("a")[2])
            tables.release(["a"])
        chunks, new_k, new_v = [], [], []
        for name, n in step:
            ks, vs, blocks = history.setdefault(name, ([], [], []))
            start = len(ks)
            while len(blocks) * BLOCK < start + n:
                blocks.append(free.pop())
            ks.extend(torch.randn(n, KV_HEADS, HEAD_DIM, generator=gen).unbind(0))
            vs.extend(torch.randn(n, KV_HEADS, HEAD_DIM, generator=gen).unbind(0))
            new_k += ks[start:]
            new_v += vs[start:]
            chunks.append(ScheduledChunk(name, [0] * n, start, blocks, True, SamplingParams()))
        k, v = torch.stack(new_k), torch.stack(new_v)
        q = torch.randn(k.shape[0], HEADS, HEAD_DIM, generator=gen)
        meta = prepare_step_inputs(chunks, BLOCK, torch.device("cpu"), window, tables).attn
        assert meta.decode is None or meta.decode.mirror is not None
        backend.write_kv(cache, k, v, meta)
        out = backend.attend(q, k, v, cache, meta)
        row = 0
        for c in chunks:
            ks, vs, _ = history[c.request_id]
            expected = _dense_reference(
                q[row : row + c.num_tokens], torch.stack(ks), torch.stack(vs), window
            )
            torch.testing.assert_close(out[row : row + c.num_tokens], expected)
            row += c.num_tokens
