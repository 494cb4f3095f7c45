"""Builds the configured transfer backend and describes torch KV tensors for it."""

from __future__ import annotations

import torch

from cache_transfer.backend import TransferBackend
from cache_transfer.layout import KVLayout, KVRegions


def make_backend(name: str, agent_name: str, host: str) -> TransferBackend:
    """`name` is the YAML's transfer.backend ("nixl" or "tcp"); `host` is the node address."""
    name = getattr(name, "value", name)
    if name == "nixl":
        from cache_transfer.nixl_backend import NixlBackend

        return NixlBackend(agent_name)
    if name == "tcp":
        from cache_transfer.tcp_backend import TcpBackend

        return TcpBackend(agent_name, host)
    raise ValueError(f"unknown transfer backend {name!r}")


def regions_of_tensors(layer_tensors: list[torch.Tensor]) -> KVRegions:
    """KV regions of per-layer tensors shaped [num_blocks, 2, block_size, kv_heads, head_dim]."""
    first = layer_tensors[0]
    num_blocks, two, block_size, kv_heads, head_dim = first.shape
    assert two == 2 and all(t.is_contiguous() and t.shape == first.shape for t in layer_tensors)
    layout = KVLayout(
        num_layers=len(layer_tensors),
        num_blocks=num_blocks,
        block_size=block_size,
        kv_heads=kv_heads,
        head_dim=head_dim,
        itemsize=first.element_size(),
    )
    device = "cuda" if first.is_cuda else "cpu"
    return KVRegions(
        layout,
        tuple(t.data_ptr() for t in layer_tensors),
        device=device,
        device_id=first.device.index or 0,
    )
