"""KV cache tensors in GPU memory that a second process (the cache messager) maps over CUDA IPC.

The prefill worker owns one device allocation holding every layer (layer l starts at
``l * layer_nbytes``) and hands out a plain, msgpack-able ``handle()``: the layout, the dtype, the
GPU's UUID and the CUDA IPC handle of the allocation. The messager ``attach``es it and sees the
same bytes at its own device address, which it registers with NIXL as VRAM; NIXL (UCX's
cuda_ipc transport on one node, GPUDirect RDMA across nodes) then WRITEs blocks straight from
P's cache into D's, with no host copy.

Facts this relies on:
- Ray gives every actor its own CUDA_VISIBLE_DEVICES, so P's device index means nothing in the
  messager; the GPU is named by UUID and found among the devices the messager sees (the
  launcher starts the messager with all of the node's GPUs visible).
- torch's ``UntypedStorage._share_cuda_`` returns the IPC handle of the caching allocator's
  segment plus the storage's offset inside it, and ``_new_shared_cuda`` maps that segment in
  another process (the same pair ``torch.multiprocessing`` uses, without pickling the tensor).
  torch counts the importers, so P's segment is not reused while the messager holds it.
- The memory stays P's: the messager must drop its mapping before P frees the cache, and a dead
  P takes the memory with it (the messager is re-attached to the restarted P by the launcher).
"""

from __future__ import annotations

from typing import Any

import torch

from cache_transfer.layout import KVLayout, KVRegions

CUDA_KV_WIRE_VERSION = 1
KIND = "cuda_ipc"


class CudaKVError(RuntimeError):
    """A CUDA KV cache cannot be allocated, exported or mapped as described."""


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CudaKVError(f"unknown KV dtype {name!r}")
    return dtype


def device_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


def device_index_of(uuid: str) -> int:
    """This process's index of the GPU with `uuid`; CudaKVError if it is not visible here."""
    for index in range(torch.cuda.device_count()):
        if device_uuid(index) == uuid:
            return index
    raise CudaKVError(
        f"GPU {uuid} is not visible in this process ({torch.cuda.device_count()} visible); "
        "the cache messager must run on the prefill instance's node with its GPUs visible"
    )


class CudaKVCache:
    """Per-layer ``[num_blocks, 2, block_size, kv_heads, head_dim]`` KV tensors on one GPU.

    Build with ``create`` (the owner, which computes into it) or ``attach`` (the messager).
    """

    def __init__(self, layout: KVLayout, dtype: torch.dtype, buffer: torch.Tensor, owner: bool):
        self.layout = layout
        self.dtype = dtype
        self.is_owner = owner
        self._buffer: torch.Tensor | None = buffer  # uint8, every layer back to back

    @classmethod
    def create(cls, layout: KVLayout, dtype: torch.dtype, device: torch.device) -> CudaKVCache:
        """A zero-filled cache on `device` (zeros: attention reads padding slots, see kv_cache)."""
        if torch.empty((), dtype=dtype).element_size() != layout.itemsize:
            raise CudaKVError(f"{dtype} is not {layout.itemsize} bytes per item")
        nbytes = layout.layer_nbytes * layout.num_layers
        buffer = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        return cls(layout, dtype, buffer, owner=True)

    @classmethod
    def attach(cls, handle: dict[str, Any]) -> CudaKVCache:
        """Map the cache described by the owner's ``handle()`` (another process, same node)."""
        if not isinstance(handle, dict) or handle.get("version") != CUDA_KV_WIRE_VERSION:
            raise CudaKVError(f"unsupported CUDA KV handle {handle!r}")
        try:
            layout = KVLayout.from_wire(handle["layout"])
            dtype = _dtype(str(handle["dtype"]))
            ipc = handle["ipc"]
            index = device_index_of(str(handle["device_uuid"]))
            storage = torch.UntypedStorage._new_shared_cuda(
                index,
                bytes(ipc["handle"]),
                int(ipc["size"]),
                int(ipc["offset"]),
                bytes(ipc["ref_counter_handle"]),
                int(ipc["ref_counter_offset"]),
                bytes(ipc["event_handle"]),
                bool(ipc["event_sync_required"]),
            )
        except KeyError as exc:
            raise CudaKVError(f"CUDA KV handle lacks {exc}") from None
        except RuntimeError as exc:  # the CUDA driver's refusal, e.g. another node's handle
            raise CudaKVError(f"cannot map the prefill instance's KV cache: {exc}") from exc
        buffer = torch.empty(0, dtype=torch.uint8, device=f"cuda:{index}").set_(storage)
        expected = layout.layer_nbytes * layout.num_layers
        if buffer.numel() < expected:
            raise CudaKVError(f"mapped {buffer.numel()} bytes, the layout needs {expected}")
        return cls(layout, dtype, buffer[:expected], owner=False)

    def handle(self) -> dict[str, Any]:
        """What the messager needs to ``attach``: plain, msgpack-able."""
        buffer = self._require_open()
        (_, ipc_handle, size, offset, ref_handle, ref_offset, event, sync) = (
            buffer.untyped_storage()._share_cuda_()
        )
        if buffer.storage_offset() != 0:
            raise CudaKVError("the KV buffer must start its storage")
        return {
            "version": CUDA_KV_WIRE_VERSION,
            "kind": KIND,
            "layout": self.layout.to_wire(),
            "dtype": str(self.dtype).removeprefix("torch."),
            "device_uuid": device_uuid(buffer.device.index or 0),
            "ipc": {
                "handle": ipc_handle,
                "size": size,
                "offset": offset,
                "ref_counter_handle": ref_handle,
                "ref_counter_offset": ref_offset,
                "event_handle": event or b"",
                "event_sync_required": sync,
            },
        }

    def _require_open(self) -> torch.Tensor:
        if self._buffer is None:
            raise CudaKVError("CUDA KV cache is closed")
        return self._buffer

    def layer_tensors(self) -> list[torch.Tensor]:
        """One tensor per layer, ``[num_blocks, 2, block_size, kv_heads, head_dim]``, in place."""
        buffer, size = self._require_open(), self.layout.layer_nbytes
        return [
            buffer[layer * size : (layer + 1) * size].view(self.dtype).view(self.layout.layer_shape)
            for layer in range(self.layout.num_layers)
        ]

    def regions(self) -> KVRegions:
        """This process's device addresses of the layers, for a transfer backend."""
        buffer = self._require_open()
        base, size = buffer.data_ptr(), self.layout.layer_nbytes
        addrs = tuple(base + layer * size for layer in range(self.layout.num_layers))
        return KVRegions(self.layout, addrs, device="cuda", device_id=buffer.device.index or 0)

    def close(self) -> None:
        """Drop this process's reference; the owner's memory goes back to its allocator. An
        attacher waits for its pending work on the mapping first. Idempotent."""
        buffer, self._buffer = self._buffer, None
        if buffer is not None and not self.is_owner:
            torch.cuda.synchronize(buffer.device)
