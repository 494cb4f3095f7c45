"""KV cache tensors in POSIX shared memory, so a second process (the cache messager) can map them.

One segment holds all layers; layer l starts at ``l * layer_stride`` (the layer size rounded up
to a page, so each layer registers on page boundaries). The owner (the worker that computes
into the cache) creates it; the messager attaches with the msgpack-able ``handle()`` dict.

Lifetime rules, chosen so nothing is left in /dev/shm:
- The owner creates the segment with ``multiprocessing.shared_memory.SharedMemory``, which
  registers the name with Python's resource tracker: if the owner dies without cleaning up, the
  tracker unlinks it. ``close()`` on the owner unlinks the name (``unlink()`` does so early, e.g.
  once every attacher has mapped it); the memory itself lives until the last mapping goes.
- Attachers map ``/dev/shm/<name>`` directly instead of through ``SharedMemory``: on Python 3.11
  ``SharedMemory(create=False)`` also registers the name with the resource tracker, which then
  unlinks the owner's segment when the attacher exits, and ``multiprocessing`` children share
  the parent's tracker, so "unregister after attach" would drop the owner's registration too.
- Tensor and array views hold a buffer export on the mapping (they are built through numpy,
  not ``torch.frombuffer``, which keeps no export and would let ``close()`` unmap memory under
  a live tensor). ``close()`` therefore never invalidates a view: if views are still alive the
  mapping stays until they are garbage collected.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
from multiprocessing import shared_memory
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from cache_transfer.layout import KVLayout, KVRegions

if TYPE_CHECKING:
    import torch

SHARED_KV_WIRE_VERSION = 1
KIND = "shm"
_SHM_DIR = "/dev/shm"
_ITEMSIZE = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
    "uint8": 1,
}


class SharedKVError(RuntimeError):
    """A shared KV segment cannot be created, found or mapped as described."""


def _dtype_name(dtype: torch.dtype | str) -> str:
    name = dtype if isinstance(dtype, str) else str(dtype)
    name = name.removeprefix("torch.")
    if name not in _ITEMSIZE:
        raise SharedKVError(f"unsupported KV dtype {dtype!r}; one of {sorted(_ITEMSIZE)}")
    return name


def _layer_stride(layout: KVLayout) -> int:
    return -(-layout.layer_nbytes // mmap.PAGESIZE) * mmap.PAGESIZE


def _map(name: str, size: int) -> mmap.mmap:
    """Map an existing segment by name without involving the resource tracker (see above)."""
    if "/" in name or not name:
        raise SharedKVError(f"bad shared memory name {name!r}")
    try:
        fd = os.open(os.path.join(_SHM_DIR, name), os.O_RDWR)
    except FileNotFoundError:
        raise SharedKVError(f"shared KV segment {name!r} does not exist") from None
    try:
        actual = os.fstat(fd).st_size
        if actual < size:
            raise SharedKVError(f"segment {name!r} has {actual} bytes, layout needs {size}")
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


class SharedKVCache:
    """Per-layer ``[num_blocks, 2, block_size, kv_heads, head_dim]`` KV tensors in shared memory.

    Build with ``create`` (owner) or ``attach`` (any other process on the node).
    """

    def __init__(
        self,
        name: str,
        layout: KVLayout,
        dtype_name: str,
        mapping: mmap.mmap,
        owner: shared_memory.SharedMemory | None,
    ) -> None:
        self.name = name
        self.layout = layout
        self.dtype_name = dtype_name
        self.layer_stride = _layer_stride(layout)
        self._mapping: mmap.mmap | None = mapping
        self._bytes: np.ndarray | None = np.frombuffer(mapping, dtype=np.uint8)
        self._owner = owner
        self._created = owner is not None
        self._tensors: list[torch.Tensor] | None = None

    @classmethod
    def create(cls, name_prefix: str, layout: KVLayout, dtype: torch.dtype | str) -> SharedKVCache:
        """A new zero-filled segment named ``<name_prefix>_<random>``; the caller owns it."""
        dtype_name = _dtype_name(dtype)
        if _ITEMSIZE[dtype_name] != layout.itemsize:
            raise SharedKVError(f"{dtype_name} is not {layout.itemsize} bytes per item")
        size = _layer_stride(layout) * layout.num_layers
        name = f"{name_prefix}_{secrets.token_hex(6)}"
        owner = shared_memory.SharedMemory(name=name, create=True, size=size)
        try:
            mapping = _map(name, size)
        except BaseException:
            owner.close()
            owner.unlink()
            raise
        # Keep only our own mapping (see the module docstring); the object stays for unlink().
        owner.close()
        return cls(name, layout, dtype_name, mapping, owner)

    @staticmethod
    def remove_stale(name_prefix: str) -> int:
        """Unlink segments left by a crashed earlier owner of `name_prefix` (a restarted actor
        reuses its name, so its previous incarnation's segments match). Returns how many."""
        removed = 0
        for path in Path("/dev/shm").glob(f"{name_prefix}_*"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
        return removed

    @classmethod
    def attach(cls, handle: dict[str, Any]) -> SharedKVCache:
        """Map the segment described by another process's ``handle()``."""
        if not isinstance(handle, dict) or handle.get("version") != SHARED_KV_WIRE_VERSION:
            raise SharedKVError(f"unsupported shared KV handle {handle!r}")
        try:
            layout = KVLayout.from_wire(handle["layout"])
            name, dtype_name = str(handle["name"]), _dtype_name(handle["dtype"])
        except KeyError as exc:
            raise SharedKVError(f"shared KV handle lacks {exc}") from None
        mapping = _map(name, _layer_stride(layout) * layout.num_layers)
        return cls(name, layout, dtype_name, mapping, owner=None)

    def handle(self) -> dict[str, Any]:
        """What another process needs to ``attach``: plain, msgpack-able."""
        return {
            "version": SHARED_KV_WIRE_VERSION,
            "kind": KIND,
            "name": self.name,
            "layout": self.layout.to_wire(),
            "dtype": self.dtype_name,
        }

    @property
    def is_owner(self) -> bool:
        """Whether this process created the segment (and so unlinks it)."""
        return self._created

    def _require_open(self) -> np.ndarray:
        if self._bytes is None:
            raise SharedKVError(f"shared KV cache {self.name!r} is closed")
        return self._bytes

    def layer_bytes(self, layer: int) -> np.ndarray:
        """Layer ``layer`` as a writable uint8 view ``[num_blocks, block_nbytes]`` (no torch)."""
        start = layer * self.layer_stride
        flat = self._require_open()[start : start + self.layout.layer_nbytes]
        return flat.reshape(self.layout.num_blocks, self.layout.block_nbytes)

    def layer_tensors(self) -> list[torch.Tensor]:
        """One writable tensor per layer, ``[num_blocks, 2, block_size, kv_heads, head_dim]``."""
        import torch

        if self._tensors is None:
            dtype = getattr(torch, self.dtype_name)
            self._tensors = [
                # [num_blocks, block_nbytes] uint8 -> flat dtype -> the layer shape
                torch.from_numpy(self.layer_bytes(layer))
                .view(-1)
                .view(dtype)
                .view(self.layout.layer_shape)
                for layer in range(self.layout.num_layers)
            ]
        return self._tensors

    def regions(self) -> KVRegions:
        """This process's addresses of the layers, for registering with a transfer backend."""
        base = self._require_open().ctypes.data
        addrs = tuple(base + layer * self.layer_stride for layer in range(self.layout.num_layers))
        return KVRegions(self.layout, addrs, device="cpu", device_id=0)

    def unlink(self) -> None:
        """Owner only: remove the name now; mappings stay valid until closed."""
        if not self._created:
            raise SharedKVError("only the owner of a shared KV cache unlinks it")
        owner, self._owner = self._owner, None
        if owner is not None:
            with contextlib.suppress(FileNotFoundError):  # already gone is what unlink wants
                owner.unlink()

    def close(self) -> None:
        """Drop this process's mapping (the owner also unlinks the name). Idempotent."""
        if self._created:
            self.unlink()
        self._tensors = None
        self._bytes = None
        mapping, self._mapping = self._mapping, None
        if mapping is not None:
            # A caller still holding views keeps the mapping until they are collected.
            with contextlib.suppress(BufferError):
                mapping.close()

    def __enter__(self) -> SharedKVCache:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
