"""Sweep of the Triton paged-attention launch configs on the GPU, against the ceilings.

    . .devbundle/activate.sh && python3 benchmarks/gpu_attention.py

Llama-3-8B attention shapes (32 query heads, 8 kv heads, head dim 128, block size 16, bf16):
decode at batch 1 and 128 with a 1k context (bandwidth: K and V bytes read over the time,
against the device copy rate), and a 4k-token prefill (TFLOP/s of the causal half, against
torch's SDPA (FlashAttention) on the same contiguous tensors).
"""

from __future__ import annotations

import itertools
import random

import torch
import torch.nn.functional as F

from benchmarks.gpu_decode import measure_copy_bandwidth, time_cuda
from engine.batch import ScheduledChunk
from engine.sampling_params import SamplingParams
from worker.attention.triton_paged import LaunchConfig, TritonPagedAttention

HEADS, KV_HEADS, HD, BS = 32, 8, 128, 16


def make_chunks(shapes: list[tuple[int, int]], num_blocks: int) -> list[ScheduledChunk]:
    free = list(range(num_blocks))
    random.Random(0).shuffle(free)
    chunks = []
    for i, (ctx, n) in enumerate(shapes):
        blocks = [free.pop() for _ in range(-(-(ctx + n) // BS))]
        chunks.append(ScheduledChunk(f"r{i}", [0] * n, ctx, blocks, True, SamplingParams()))
    return chunks


def time_attend(backend, shapes, cache) -> float:
    chunks = make_chunks(shapes, cache.shape[0])
    meta = backend.prepare_inputs(chunks, BS, torch.device("cuda"), None).attn
    tokens = sum(n for _, n in shapes)
    q = torch.randn(tokens, HEADS, HD, device="cuda", dtype=torch.bfloat16)
    return time_cuda(lambda: backend.attend(q, q, q, cache, meta), 20)


def sweep_decode(cache, copy_bw: float) -> None:
    backend = TritonPagedAttention(HEADS, KV_HEADS, HD)
    for batch in (1, 8, 128):
        kv_bytes = batch * 1024 * KV_HEADS * HD * 2 * 2
        for block_n, warps, stages in itertools.product((32, 64, 128), (2, 4, 8), (2, 3)):
            backend.decode_config = LaunchConfig(block_n, warps, stages)
            seconds = time_attend(backend, [(1023, 1)] * batch, cache)
            print(
                f"decode b={batch:3d} block_n={block_n:3d} warps={warps} stages={stages}: "
                f"{seconds * 1e6:7.1f} us, {kv_bytes / seconds / copy_bw * 100:5.1f}% of copy rate"
            )


def sweep_prefill(cache) -> None:
    n = 4096
    flops = 2 * n * n * HD * HEADS  # QK^T and PV over the causal half
    backend = TritonPagedAttention(HEADS, KV_HEADS, HD)
    for block_n, warps, stages in itertools.product((32, 64, 128), (4, 8), (2, 3)):
        backend.prefill_config = LaunchConfig(block_n, warps, stages)
        seconds = time_attend(backend, [(0, n)], cache)
        print(
            f"prefill 4k block_n={block_n:3d} warps={warps} stages={stages}: "
            f"{seconds * 1e3:6.2f} ms, {flops / seconds / 1e12:5.0f} TFLOP/s"
        )
    q = torch.randn(1, HEADS, n, HD, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, KV_HEADS, n, HD, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    seconds = time_cuda(
        lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), 20
    )
    print(f"prefill 4k torch SDPA: {seconds * 1e3:6.2f} ms, {flops / seconds / 1e12:5.0f} TFLOP/s")


def main() -> None:
    copy_bw = measure_copy_bandwidth()
    num_blocks = 128 * 65 + 300
    cache = torch.randn(num_blocks, 2, BS, KV_HEADS, HD, device="cuda", dtype=torch.bfloat16)
    sweep_decode(cache, copy_bw)
    sweep_prefill(cache)


if __name__ == "__main__":
    main()
