"""The fused Triton elementwise ops against the torch code they replace, on the GPU.

They round where the torch code rounds, so in bf16 nearly every element is bit-identical; the
RMSNorm's fp32 sum runs in a different order, which may move a rare element by one ulp.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from worker.models.llama import apply_rope, rms_norm, rope_cos_sin

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def close(got: torch.Tensor, want: torch.Tensor) -> float:
    """Every element within 1 bf16 ulp; returns the fraction that is bit-identical, or 1.0 in
    fp32, where instruction order (not rounding points) makes last-bit differences normal."""
    assert got.shape == want.shape and torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want.float(), rtol=8e-3, atol=1e-5)
    if got.dtype == torch.float32:
        return 1.0
    return (got == want).float().mean().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hidden", [576, 4096])
def test_add_rms_norm(dtype, hidden) -> None:
    from worker.models.triton_ops import TritonOps

    x, d = (torch.randn(37, hidden, device="cuda").to(dtype) for _ in range(2))
    w = (1 + 0.2 * torch.randn(hidden, device="cuda")).to(dtype)
    normed, h = TritonOps().add_rms_norm(x, d, w, 1e-5)
    assert torch.equal(h, x + d)
    assert close(normed, rms_norm(x + d, w, 1e-5)) > 0.99
    normed, h = TritonOps().add_rms_norm(x, None, w, 1e-5)
    assert h is x and close(normed, rms_norm(x, w, 1e-5)) > 0.99


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(32, 8, 128), (9, 3, 64)])
def test_rope_and_silu_mul(dtype, shape) -> None:
    from worker.models.triton_ops import TritonOps

    heads, kvh, hd = shape
    qkv = torch.randn(21, (heads + 2 * kvh) * hd, device="cuda").to(dtype)
    qk = qkv[:, : (heads + kvh) * hd].view(21, heads + kvh, hd)  # strided rows, as in the model
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, hd, 2, device="cuda").float() / hd))
    cos, sin = rope_cos_sin(inv_freq, torch.arange(100, 121, device="cuda"), dtype)
    assert close(TritonOps().rope(qk, cos, sin), apply_rope(qk, cos, sin)) > 0.99
    gate_up = torch.randn(21, 2 * 1536, device="cuda").to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    assert close(TritonOps().silu_mul(gate_up), F.silu(gate) * up) > 0.99
