"""Attention backends behind one small interface.

Contract: per layer the model calls `write_kv` (store the step's new K/V in the paged cache),
then `attend` (attention of the step's queries over positions 0 .. end of each chunk, reading
keys and values through the block tables in `AttentionMetadata`, or, for a chunk that starts at
position 0, from its fresh k/v). Backends keep no state between steps, so a Triton backend can
replace the torch one without touching the model.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Protocol

import torch

from worker.attention.metadata import AttentionMetadata, StepInputs, prepare_step_inputs
from worker.attention.torch_paged import TorchPagedAttention

PREFILL_ATTENTION = ("auto", "paged")
# The dtypes FlashAttention runs; in others SDPA would fall back to slower kernels.
FLASH_DTYPES = (torch.bfloat16, torch.float16)


class AttentionBackend(Protocol):
    name: str

    def write_kv(
        self, kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> None:
        """Store k, v `[T, kv_heads, head_dim]` at the step's slots of one layer's cache."""
        ...

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_layer: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """q `[T, heads, head_dim]`, the step's k/v -> attention output `[T, heads * head_dim]`."""
        ...


def make_attention_backend(
    name: str,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    device: torch.device | None = None,
    prefill_attention: str = "auto",
    dtype: torch.dtype | None = None,
) -> AttentionBackend:
    """`torch`, `triton` (CUDA only), or `auto`: Triton on CUDA when installed, else torch.

    `prefill_attention` (engine config): `auto` lets the Triton backend hand long chunks without
    a cached prefix to FlashAttention when `dtype` is one FlashAttention runs (bf16, fp16);
    `paged` keeps every chunk on the paged kernel. The torch backend already attends such
    chunks from their own K/V with SDPA."""
    if prefill_attention not in PREFILL_ATTENTION:
        raise ValueError(f"unknown prefill_attention {prefill_attention!r} (auto, paged)")
    if name == "auto":
        on_cuda = device is not None and device.type == "cuda"
        name = "triton" if on_cuda and importlib.util.find_spec("triton") else "torch"
    if name == "torch":
        return TorchPagedAttention(num_heads, num_kv_heads, head_dim)
    if name == "triton":
        # Imported here: Triton is absent from CPU-only installs.
        from worker.attention.triton_paged import TritonPagedAttention

        flash = prefill_attention == "auto" and dtype in FLASH_DTYPES
        return TritonPagedAttention(num_heads, num_kv_heads, head_dim, flash_prefill=flash)
    raise ValueError(f"unknown attention backend {name!r} (available: auto, torch, triton)")


def prepare_inputs_for(backend: AttentionBackend) -> Callable[..., StepInputs]:
    """The step-input builder a backend reads: its own `prepare_inputs`, else the torch one."""
    return getattr(backend, "prepare_inputs", prepare_step_inputs)


__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "StepInputs",
    "TorchPagedAttention",
    "make_attention_backend",
    "prepare_inputs_for",
    "prepare_step_inputs",
]
