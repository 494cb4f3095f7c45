"""The paged KV cache: one tensor per layer, `[num_blocks, 2, block_size, kv_heads, head_dim]`.

One block of one layer (its K then its V) is a single contiguous region, so a transfer backend
registers each layer tensor once and then moves blocks by id. The tensors are either allocated
here (zeros) or handed in already made, e.g. views of shared memory that another process maps.
Attention reads padding slots of partly filled blocks (and masks them out), so the memory must
hold finite values: zeros, or KV left behind by an earlier request.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.model_config import ModelArchConfig


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def layer_shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_blocks, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of one layer (K and V)."""
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * _itemsize(self.dtype)


def bytes_per_block(config: ModelArchConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers."""
    per_layer = 2 * block_size * config.num_kv_heads * config.head_dim * _itemsize(dtype)
    return per_layer * config.num_layers


def num_blocks_for_budget(
    config: ModelArchConfig, block_size: int, dtype: torch.dtype, budget_bytes: int
) -> int:
    """How many blocks fit in `budget_bytes` of KV memory (all layers together)."""
    num_blocks = budget_bytes // bytes_per_block(config, block_size, dtype)
    if num_blocks < 1:
        raise ValueError(f"KV budget of {budget_bytes} bytes does not hold a single block")
    return num_blocks


def make_kv_cache_spec(
    config: ModelArchConfig, num_blocks: int, block_size: int, dtype: torch.dtype
) -> KVCacheSpec:
    return KVCacheSpec(
        num_layers=config.num_layers,
        num_blocks=num_blocks,
        block_size=block_size,
        num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        dtype=dtype,
    )


class KVCache:
    """Per-layer KV tensors. `layers[i]` is layer i's `[num_blocks, 2, block_size, kvh, hd]`."""

    def __init__(self, spec: KVCacheSpec, layers: list[torch.Tensor]) -> None:
        _check_layers(spec, layers)
        self.spec = spec
        self.layers = layers

    @classmethod
    def allocate(cls, spec: KVCacheSpec, device: torch.device | str) -> KVCache:
        layers = [torch.zeros(spec.layer_shape, dtype=spec.dtype, device=device)]
        layers += [torch.zeros_like(layers[0]) for _ in range(spec.num_layers - 1)]
        return cls(spec, layers)

    @classmethod
    def from_tensors(cls, spec: KVCacheSpec, tensors: list[torch.Tensor]) -> KVCache:
        """Wrap pre-made tensors (e.g. shared memory); they are used in place, never copied."""
        return cls(spec, list(tensors))

    @property
    def block_size(self) -> int:
        return self.spec.block_size

    @property
    def num_blocks(self) -> int:
        return self.spec.num_blocks

    def block_region(self, layer: int, block: int) -> tuple[int, int]:
        """(address, nbytes) of one block of one layer: what a transfer descriptor names."""
        tensor = self.layers[layer]
        return tensor[block].data_ptr(), self.spec.block_bytes


def _check_layers(spec: KVCacheSpec, layers: list[torch.Tensor]) -> None:
    if len(layers) != spec.num_layers:
        raise ValueError(f"expected {spec.num_layers} KV layer tensors, got {len(layers)}")
    for i, t in enumerate(layers):
        if tuple(t.shape) != spec.layer_shape or t.dtype != spec.dtype:
            raise ValueError(
                f"KV layer {i}: expected {spec.layer_shape} {spec.dtype}, "
                f"got {tuple(t.shape)} {t.dtype}"
            )
        if not t.is_contiguous():
            raise ValueError(f"KV layer {i} must be contiguous")


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
