"""Random paged-attention steps and their float64 dense reference (shared by the GPU tests).

A case is a mixed batch: decodes, fresh prefills and prefills after a cached prefix, with block
tables drawn from a shuffled free list so that neighbouring positions live in far-apart blocks.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from engine.batch import ScheduledChunk
from engine.sampling_params import SamplingParams


@dataclass
class AttentionCase:
    chunks: list[ScheduledChunk]
    cache: torch.Tensor  # [num_blocks, 2, bs, kvh, hd], prefixes written, new slots poisoned
    q: torch.Tensor  # [T, heads, hd]
    new_k: torch.Tensor  # [T, kvh, hd]
    new_v: torch.Tensor
    full_k: list[torch.Tensor]  # per chunk [ctx + n, kvh, hd] (prefix + new)
    full_v: list[torch.Tensor]
    shapes: list[tuple[int, int]]  # (cached context, new tokens) per chunk


def make_case(
    shapes: list[tuple[int, int]],
    heads: int,
    kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: str,
    seed: int = 0,
) -> AttentionCase:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-(c + n) // block_size) for c, n in shapes) + 7
    free = list(range(num_blocks))
    rng.shuffle(free)
    cache = torch.randn(num_blocks, 2, block_size, kv_heads, head_dim, generator=gen)
    full_k, full_v, chunks = [], [], []
    for i, (ctx, n) in enumerate(shapes):
        blocks = [free.pop() for _ in range(-(-(ctx + n) // block_size))]
        k = torch.randn(ctx + n, kv_heads, head_dim, generator=gen)
        v = torch.randn(ctx + n, kv_heads, head_dim, generator=gen)
        for p in range(ctx):  # the prefix is already in the cache
            cache[blocks[p // block_size], 0, p % block_size] = k[p]
            cache[blocks[p // block_size], 1, p % block_size] = v[p]
        full_k.append(k.to(dtype).double())
        full_v.append(v.to(dtype).double())
        chunks.append(ScheduledChunk(f"r{i}", [0] * n, ctx, blocks, True, SamplingParams()))
    q = torch.randn(sum(n for _, n in shapes), heads, head_dim, generator=gen)
    new_k = torch.cat([k[c:] for k, (c, _) in zip(full_k, shapes, strict=True)])
    new_v = torch.cat([v[c:] for v, (c, _) in zip(full_v, shapes, strict=True)])
    return AttentionCase(
        chunks=chunks,
        cache=cache.to(dtype).to(device),
        q=q.to(dtype).to(device),
        new_k=new_k.to(dtype).to(device),
        new_v=new_v.to(dtype).to(device),
        full_k=full_k,
        full_v=full_v,
        shapes=shapes,
    )


def dense_reference(case: AttentionCase, window: int | None) -> torch.Tensor:
    """float64 attention of every chunk's queries over its whole context -> `[T, heads * hd]`."""
    heads, hd = case.q.shape[1], case.q.shape[2]
    outs = []
    start = 0
    for k, v, (_, n) in zip(case.full_k, case.full_v, case.shapes, strict=True):
        q = case.q[start : start + n].double().cpu()
        s = k.shape[0]
        q_pos = torch.arange(s - n, s)[:, None]
        k_pos = torch.arange(s)[None, :]
        mask = k_pos <= q_pos
        if window is not None:
            mask &= k_pos > q_pos - window
        group = heads // k.shape[1]
        kk = k.repeat_interleave(group, dim=1)
        vv = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("nhd,shd->hns", q, kk) / hd**0.5
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        outs.append(torch.einsum("hns,shd->nhd", probs, vv).reshape(n, -1))
        start += n
    return torch.cat(outs)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.double().cpu()
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out - ref).norm() / ref.norm()).item()
