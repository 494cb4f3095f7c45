"""Fused elementwise kernels for the Llama forward on CUDA (Triton).

A decode step of one sequence spends more time in launches of tiny elementwise kernels than in
some of its matmuls: RMSNorm alone is eight kernels in transformers' fp32-then-cast order. Each
op here is one kernel and rounds where the torch code it replaces rounds, so outputs equal
the torch path up to the order of the fp32 sum in the norm:
- `add_rms_norm`: h = x + delta (rounded to the model dtype), normed = w * (h * rsqrt(mean(h^2)
  + eps) rounded); returns (normed, h).
- `rope`: rotate-half RoPE of `[T, heads, hd]` (any row stride) into a new contiguous tensor:
  round(round(x * cos) + x_swapped * sin).
- `silu_mul`: gate_up `[T, 2I]` -> round(round(silu(gate)) * up) `[T, I]`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(
    x_ptr, delta_ptr, w_ptr, h_ptr, out_ptr, eps,
    N: tl.constexpr, BLOCK: tl.constexpr, HAS_DELTA: tl.constexpr, HALF: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    h = tl.load(x_ptr + row * N + offs, mask=mask, other=0.0)
    if HAS_DELTA:
        d = tl.load(delta_ptr + row * N + offs, mask=mask, other=0.0)
        h = (h.to(tl.float32) + d.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(h_ptr + row * N + offs, h, mask=mask)
    h32 = h.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(h32 * h32, 0) / N + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HALF:  # noqa: SIM108 (a compile-time branch) transformers' order: cast, then scale
        normed = (h32 * rstd).to(x_ptr.dtype.element_ty).to(tl.float32) * w
    else:
        normed = h32 * rstd * w
    tl.store(out_ptr + row * N + offs, normed.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr, stride_xt, num_heads,
    HD: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BH]
    d = tl.arange(0, HD)
    hmask = (h < num_heads)[:, None]
    base = x_ptr + t * stride_xt + h[:, None] * HD
    x = tl.load(base + d[None, :], mask=hmask, other=0.0)  # [BH, HD]
    swapped = tl.load(base + ((d + HD // 2) % HD)[None, :], mask=hmask, other=0.0)
    cos = tl.load(cos_ptr + t * HD + d).to(tl.float32)  # [HD]
    sin = tl.load(sin_ptr + t * HD + d).to(tl.float32)  # [HD], signed (-sin, sin)
    a = (x.to(tl.float32) * cos[None, :]).to(out_ptr.dtype.element_ty).to(tl.float32)
    out = a + swapped.to(tl.float32) * sin[None, :]
    o_ptrs = out_ptr + t * num_heads * HD + h[:, None] * HD + d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=hmask)


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, INTER: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < INTER
    g = tl.load(gu_ptr + t * 2 * INTER + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + t * 2 * INTER + INTER + offs, mask=mask, other=0.0).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + t * INTER + offs, (s * u).to(out_ptr.dtype.element_ty), mask=mask)


class TritonOps:
    """The fused ops, used by LlamaForCausalLM on CUDA when Triton is installed."""

    def add_rms_norm(
        self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x, delta `[T, H]` -> (rms_norm(x + delta) * weight, x + delta)."""
        num_tokens, n = x.shape
        assert x.is_contiguous() and (delta is None or delta.is_contiguous())
        h = torch.empty_like(x) if delta is not None else x
        out = torch.empty_like(x)
        block = triton.next_power_of_2(n)
        _add_rms_norm_kernel[(num_tokens,)](
            x, delta if delta is not None else x, weight, h, out, eps,
            N=n, BLOCK=block, HAS_DELTA=delta is not None, HALF=x.dtype != torch.float32,
            num_warps=min(16, max(1, block // 256)),
        )  # fmt: skip
        return out, h

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x `[T, heads, hd]` (rows may be strided), cos/sin `[T, 1, hd]` -> `[T, heads, hd]`."""
        num_tokens, heads, hd = x.shape
        assert x.stride(1) == hd and x.stride(2) == 1 and cos.is_contiguous()
        out = torch.empty(num_tokens, heads, hd, dtype=x.dtype, device=x.device)
        block_h = min(triton.next_power_of_2(heads), 16)
        grid = (num_tokens, triton.cdiv(heads, block_h))
        _rope_kernel[grid](x, cos, sin, out, x.stride(0), heads, HD=hd, BLOCK_H=block_h)
        return out

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up `[T, 2I]` (gate first) -> silu(gate) * up `[T, I]`."""
        num_tokens, two_i = gate_up.shape
        inter = two_i // 2
        out = torch.empty(num_tokens, inter, dtype=gate_up.dtype, device=gate_up.device)
        block = min(2048, triton.next_power_of_2(inter))
        grid = (num_tokens, triton.cdiv(inter, block))
        _silu_mul_kernel[grid](gate_up, out, INTER=inter, BLOCK=block, num_warps=4)
        return out
