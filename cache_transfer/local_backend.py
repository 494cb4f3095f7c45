"""The `local` transfer backend: prefill and decode on one machine copy KV memory directly.

NIXL moves KV between machines; on one machine its UCX transports pay per descriptor (CUDA IPC:
about 7 GB/s for scattered 64 KiB blocks on an H200, against a 2 TB/s device copy) or copy through
a kernel call (CMA on CPU). Here the decode instance keeps its KV cache in a store another
process can map -- POSIX shared memory on CPU, a CUDA IPC allocation on a GPU, the same stores a
prefill instance shares with its messager (factory.make_shared_kv) -- and publishes the store
handles in its endpoint. The messager maps them at `connect`, so both caches are in its address
space and a write is a plain copy of the descriptors the route table gives (whole blocks, or
head slices between tensor-parallel sizes; a planned write's rows are offset straight by this
process's mapping of the peer's layers): memmove on CPU, inside the call; on a GPU one
batched-copy kernel on the backend's own stream, launched for every write queued since the last
launch when one of them is first polled, with an event that `poll` queries.

Only for peers on the same machine: `connect` refuses another machine's endpoint by name.
"""

from __future__ import annotations

import ctypes
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cache_transfer.backend import (
    TransferBackend,
    TransferError,
    TransferHandle,
    TransferState,
    endpoint_field,
)
from cache_transfer.layout import Desc
from cache_transfer.tp_layout import RankKV
from cache_transfer.write_plan import ADDR, NBYTES, WritePlan


def machine_id() -> str:
    """Same for every process of this machine and boot, different on another machine."""
    boot = Path("/proc/sys/kernel/random/boot_id")
    return f"{socket.gethostname()}/{boot.read_text().strip() if boot.exists() else ''}"


@dataclass
class _PeerMap:
    """Where the peer's KV lies in this process: per (rank, layer) its base address there and
    here, and the region size."""

    stores: list[Any]
    theirs: np.ndarray  # [ranks, layers] base addresses in the peer's process
    ours: np.ndarray  # [ranks, layers] the same memory mapped here
    sizes: np.ndarray  # [ranks] bytes of one layer's region


class LocalBackend(TransferBackend):
    backend_name = "local"

    def __init__(self, agent_name: str) -> None:
        super().__init__(agent_name)
        self._shared: list[dict] | None = None  # this side's store handles (the target's)
        self._maps: dict[str, _PeerMap] = {}
        self._copier: Any = None  # a GpuCopier when the memory is a GPU's

    def share(self, stores_wire: list[dict]) -> None:
        """The target side: the handles of its KV stores, rank by rank (factory.rank_kv_wire),
        published in the endpoint so a source on this machine can map them."""
        with self._lock:
            self._shared = list(stores_wire)

    # -- hooks ----------------------------------------------------------------------------

    def _register(self, ranks: list[RankKV]) -> None:
        # The memory is ours already: nothing to register with anyone. On a GPU the copy
        # kernel is compiled now, before the first request's transfer.
        regions = ranks[0].regions
        if regions.device == "cuda":
            from cache_transfer.gpu_copy import GpuCopier

            _check_words(np.array([r.regions.layer_addrs for r in ranks]), self.agent_name)

            self._copier = GpuCopier(regions.device_id)
            self._copier.warm_up(regions.layer_addrs[0])

    def _register_local(self, region: Desc, mem_type: str) -> None:
        pass  # a staging buffer of this process: copied from like any other memory here

    def _endpoint_extra(self) -> dict[str, Any]:
        return {"machine": machine_id(), "stores": self._shared}

    def _dial(self, peer: str, peer_info: dict[str, Any], deadline: float) -> Any:
        from cache_transfer.factory import attach_ranks

        theirs_machine = endpoint_field(peer_info, "machine")
        if theirs_machine != machine_id():
            raise TransferError(
                f"{peer} is on another machine ({theirs_machine}); transfer.backend 'local' "
                "moves KV within one machine only (use nixl or tcp across machines)"
            )
        stores_wire = endpoint_field(peer_info, "stores")
        if not stores_wire:
            raise TransferError(f"{peer} shares no KV stores (its cache is not mappable)")
        try:
            return attach_ranks(stores_wire)
        except Exception as exc:
            raise TransferError(f"cannot map {peer}'s KV cache: {exc}") from exc

    def _abandon_dial(self, dialed: Any) -> None:
        for store in dialed[0]:
            store.close()

    def _open_peer(self, peer: str, peer_info: dict[str, Any], dialed: Any) -> None:
        stores, mapped = dialed
        published = [RankKV.from_wire(rank) for rank in peer_info["ranks"]]
        if [r.regions.layout for r in published] != [r.regions.layout for r in mapped]:
            raise TransferError(f"{peer}'s stores do not match the KV cache it registered")
        ours = np.array([r.regions.layer_addrs for r in mapped], dtype=np.int64)
        if self._copier is not None:
            _check_words(ours, peer)
        self._maps[peer] = _PeerMap(
            stores,
            np.array([r.regions.layer_addrs for r in published], dtype=np.int64),
            ours,
            np.array([r.regions.layout.layer_nbytes for r in mapped], dtype=np.int64),
        )

    def _start_write(
        self, handle: TransferHandle, src: np.ndarray, dst: np.ndarray, dst_layer: int
    ) -> None:
        lens = src[:, NBYTES]
        here = _translate(dst[:, ADDR], lens, self._maps[handle.peer], dst_layer)
        self._copy(handle, src[:, ADDR], here, lens)

    def _start_planned(
        self, handle: TransferHandle, plan: WritePlan, src_layer: int, dst_layer: int
    ) -> None:
        # The plan's rows on this process's mapping of the peer: no address translation, and on
        # a GPU the table goes to the copier as it is (the layer bases are word-aligned: they
        # were checked when registered and mapped).
        table = plan.columns(src_layer, dst_layer, self._maps[handle.peer].ours)
        self._copy_table(handle, plan, table, plan.nbytes)

    writes_across_layers = True  # every layer of the peer is mapped here

    def _start_layers(self, handle: TransferHandle, plan: WritePlan, layers: Sequence[int]) -> None:
        table = plan.columns_of_layers(layers, self._maps[handle.peer].ours)
        self._copy_table(handle, plan, table, plan.nbytes * len(layers))

    def _copy_table(
        self, handle: TransferHandle, plan: WritePlan, table: np.ndarray, nbytes: int
    ) -> None:
        if self._copier is None or not plan.aligned8:
            self._copy(handle, table[0], table[1], table[2])
        else:
            handle._impl = self._copier.add_table(table, nbytes)  # launched at the first poll

    def _copy(
        self, handle: TransferHandle, src: np.ndarray, dst: np.ndarray, lens: np.ndarray
    ) -> None:
        if self._copier is not None:  # a GPU's memory (see _register)
            handle._impl = self._copier.add(src, dst, lens)  # launched at the first poll
            return
        for s, d, n in zip(src.tolist(), dst.tolist(), lens.tolist(), strict=True):
            ctypes.memmove(d, s, n)
        handle.state = TransferState.DONE

    def poll(self, handle: TransferHandle) -> TransferState:
        with self._lock:
            copy = handle._impl
            if handle.state is TransferState.PENDING and copy is not None and copy.done():
                handle.state = TransferState.DONE
            return handle.state

    def release(self, handle: TransferHandle) -> None:
        with self._lock:
            handle.released = True
            handle._impl = None

    def _close_peer(self, peer: str, reason: str) -> None:
        peer_map = self._maps.pop(peer, None)
        if peer_map is None:
            return
        if self._copier is not None:
            self._copier.synchronize()  # no copy may still write into memory we unmap
        for store in peer_map.stores:
            store.close()

    def _close(self) -> None:
        self._copier = None


def _check_words(layer_addrs: np.ndarray, owner: str) -> None:
    """The copy kernel moves 8-byte words: planned writes rely on word-aligned layer bases."""
    if (layer_addrs % 8).any():
        raise TransferError(f"{owner}'s KV layers are not 8-byte aligned")


def _translate(addrs: np.ndarray, lens: np.ndarray, peer_map: _PeerMap, layer: int) -> np.ndarray:
    """Peer-process addresses of `layer` -> the same bytes as mapped in this process."""
    bases = peer_map.theirs[:, layer]
    order = np.argsort(bases)
    where = np.searchsorted(bases[order], addrs, side="right") - 1
    if (where < 0).any():
        raise TransferError("a destination address lies outside the peer's KV cache")
    rank = order[where]
    offset = addrs - bases[rank]
    if (offset + lens > peer_map.sizes[rank]).any():
        raise TransferError("a destination address lies outside the peer's KV cache")
    return peer_map.ours[rank, layer] + offset
