"""Builds the configured transfer backend and describes torch KV tensors for it."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cache_transfer.backend import TransferBackend
from cache_transfer.cuda_kv import CudaKVCache
from cache_transfer.layout import KVLayout, KVRegions
from cache_transfer.shared_kv import SharedKVCache
from cache_transfer.tp_layout import HeadRange, RankKV
from engine.protocol.identity import InstanceId, MessagerId


def kv_agent_name(owner: InstanceId | MessagerId) -> str:
    """The transfer agent name of an actor's KV cache: a decode instance's is also the peer name
    its messagers' backends know it by once connected."""
    return f"{owner}-kv"


def make_backend(name: str, agent_name: str, host: str) -> TransferBackend:
    """`name` is the YAML's transfer.backend (nixl, tcp, local); `host` is the node address."""
    name = getattr(name, "value", name)
    if name == "nixl":
        from cache_transfer.nixl_backend import NixlBackend

        return NixlBackend(agent_name)
    if name == "tcp":
        from cache_transfer.tcp_backend import TcpBackend

        return TcpBackend(agent_name, host)
    if name == "local":
        from cache_transfer.local_backend import LocalBackend

        return LocalBackend(agent_name)
    raise ValueError(f"unknown transfer backend {name!r}")


def make_shared_kv(
    layout: KVLayout, dtype: torch.dtype, device: torch.device, name_prefix: str
) -> SharedKVCache | CudaKVCache:
    """The KV store a prefill instance computes into and its messager maps: POSIX shared memory
    on CPU, a device allocation exported over CUDA IPC on a GPU."""
    if device.type == "cuda":
        return CudaKVCache.create(layout, dtype, device)
    SharedKVCache.remove_stale(name_prefix)  # left by this instance's crashed predecessor
    return SharedKVCache.create(name_prefix, layout, dtype)


def attach_shared_kv(handle: dict) -> SharedKVCache | CudaKVCache:
    """Map another process's KV store from its `handle()` (either kind)."""
    kind = handle.get("kind") if isinstance(handle, dict) else None
    if kind == "cuda_ipc":
        return CudaKVCache.attach(handle)
    if kind == "shm":
        return SharedKVCache.attach(handle)
    raise ValueError(f"unknown KV handle kind {kind!r} (expected 'shm' or 'cuda_ipc')")


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


KVStore = SharedKVCache | CudaKVCache


def rank_kv_wire(handles: Sequence[dict | None], heads: Sequence[tuple[int, int]]) -> list[dict]:
    """An instance's KV stores, rank by rank, as the cache messager attaches them: each rank's
    store handle and the KV heads it holds (msgpack-able)."""
    if any(handle is None for handle in handles):
        raise ValueError("a rank has no shared KV store (rank_kv_store was not given)")
    return [
        {"handle": handle, "heads": list(held)} for handle, held in zip(handles, heads, strict=True)
    ]


def attach_ranks(wire: Sequence[dict]) -> tuple[list[KVStore], list[RankKV]]:
    """Map every rank's store of `rank_kv_wire`; the stores (close them when done) and their
    RankKV for a transfer backend. Nothing stays mapped when one cannot be."""
    stores: list[KVStore] = []
    try:
        for rank in wire:
            stores.append(attach_shared_kv(rank["handle"]))
        ranks = [
            RankKV(store.regions(), HeadRange(*rank["heads"]))
            for store, rank in zip(stores, wire, strict=True)
        ]
    except BaseException:
        for store in stores:
            store.close()
        raise
    return stores, ranks
