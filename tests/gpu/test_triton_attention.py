"""The Triton paged-attention kernels against a float64 dense reference, on the GPU.

Relative error bounds: bf16 inputs land between 1e-3 and 1e-2 (rounding of the inputs and of
the probabilities fed to the second product); fp32 with exact (IEEE) products far under 1e-4.
"""

from __future__ import annotations

import pytest
import torch

from tests.gpu.attention_cases import dense_reference, make_case, relative_error
from worker.attention import TorchPagedAttention, prepare_step_inputs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

BOUND = {torch.bfloat16: 1e-2, torch.float32: 1e-4}

# (cached context, new tokens) per chunk
DECODE_1 = [(1000, 1)]
DECODE_BATCH = [(37 * i % 900 + 1, 1) for i in range(64)]
MIXED = [(9, 1), (0, 1), (300, 1), (0, 130), (70, 70), (13, 3), (3, 1), (517, 200)]
LONG_PREFILL = [(0, 1500), (256, 600)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("window", [None, 40], ids=["full", "window40"])
@pytest.mark.parametrize(
    "shapes", [DECODE_1, DECODE_BATCH, MIXED, LONG_PREFILL], ids=["d1", "d64", "mixed", "long"]
)
@pytest.mark.parametrize(
    "heads", [(32, 8, 128), (9, 3, 64), (4, 4, 32)], ids=["gqa4-hd128", "gqa3-hd64", "mha-hd32"]
)
def test_matches_float64_reference(dtype, window, shapes, heads) -> None:
    from worker.attention.triton_paged import TritonPagedAttention

    num_heads, kv_heads, head_dim = heads
    case = make_case(shapes, num_heads, kv_heads, head_dim, 16, dtype, "cuda", seed=len(shapes))
    backend = TritonPagedAttention(num_heads, kv_heads, head_dim)
    inputs = backend.prepare_inputs(case.chunks, 16, torch.device("cuda"), window)
    cache = case.cache.clone()
    backend.write_kv(cache, case.new_k, case.new_v, inputs.attn)
    out = backend.attend(case.q, case.new_k, case.new_v, cache, inputs.attn)
    err = relative_error(out, dense_reference(case, window))
    print(f"rel err {err:.2e}")
    assert err < BOUND[dtype]

    torch_meta = prepare_step_inputs(case.chunks, 16, torch.device("cuda"), window).attn
    torch_cache = case.cache.clone()
    TorchPagedAttention(num_heads, kv_heads, head_dim).write_kv(
        torch_cache, case.new_k, case.new_v, torch_meta
    )
    assert torch.equal(cache, torch_cache)  # the same slots written, nothing else touched


def test_padding_rows_write_and_read_nothing() -> None:
    """CUDA-graph padding: slot -1 writes nothing; length 0 gives a zero row, never NaN."""
    from worker.attention.triton_metadata import TritonAttentionMetadata, TritonDecode
    from worker.attention.triton_paged import TritonPagedAttention

    heads, kvh, hd, bs = 8, 2, 64, 16
    cache = torch.randn(10, 2, bs, kvh, hd, device="cuda", dtype=torch.bfloat16)
    before = cache.clone()
    q = torch.randn(4, heads, hd, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(4, kvh, hd, device="cuda", dtype=torch.bfloat16)
    decode = TritonDecode(
        num_seqs=4,
        rows=torch.arange(4, device="cuda"),
        tables=torch.zeros(4, 8, dtype=torch.int64, device="cuda"),
        lens=torch.zeros(4, dtype=torch.int64, device="cuda"),
        max_len=128,
    )
    slots = torch.full((4,), -1, dtype=torch.int64, device="cuda")
    meta = TritonAttentionMetadata(4, bs, slots, decode, None, None)
    backend = TritonPagedAttention(heads, kvh, hd)
    backend.write_kv(cache, k, k, meta)
    out = backend.attend(q, k, k, cache, meta)
    assert torch.equal(cache, before)
    assert torch.equal(out, torch.zeros_like(out))
