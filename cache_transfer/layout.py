"""KV cache layout descriptors: which bytes hold which (layer, block).

Every instance keeps one tensor per layer shaped ``[num_blocks, 2, block_size, kv_heads,
head_dim]``, so the K and V of one block of one layer are one contiguous region of
``block_nbytes`` bytes. A transfer therefore needs only block-id lists: this module turns them
into (address, nbytes, device id) descriptors, merging runs of consecutive blocks so that a
backend moves few large regions instead of many small ones.

Pure Python, no torch: the wire forms are plain dicts that msgpack can carry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any

import numpy as np

LAYOUT_WIRE_VERSION = 1

# (address, nbytes, device id): the shape NIXL's get_xfer_descs takes for a list of regions.
Desc = tuple[int, int, int]
# (src start block, dst start block, number of blocks)
PairedRun = tuple[int, int, int]

DEVICE_KINDS = ("cpu", "cuda")


class LayoutError(ValueError):
    """A layout, block id list or wire dict is invalid; raised before anything is sent."""


@dataclass(frozen=True)
class KVLayout:
    """Shape of one instance's paged KV cache."""

    num_layers: int
    num_blocks: int
    block_size: int
    kv_heads: int
    head_dim: int
    itemsize: int

    def __post_init__(self) -> None:
        for key, value in self.to_wire().items():
            if key != "version" and (not isinstance(value, int) or value <= 0):
                raise LayoutError(f"KVLayout.{key} must be a positive int, got {value!r}")

    @property
    def block_nbytes(self) -> int:
        """Bytes of one block of one layer, K and V together."""
        return 2 * self.block_size * self.kv_heads * self.head_dim * self.itemsize

    @property
    def layer_nbytes(self) -> int:
        return self.num_blocks * self.block_nbytes

    @property
    def layer_shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_blocks, 2, self.block_size, self.kv_heads, self.head_dim)

    def block_compatible(self, other: KVLayout) -> bool:
        """Whether blocks of ``other`` have the same geometry, so one can be copied onto the other.

        Layer and block counts may differ between a prefill and a decode instance.
        """
        return (self.block_size, self.kv_heads, self.head_dim, self.itemsize) == (
            other.block_size,
            other.kv_heads,
            other.head_dim,
            other.itemsize,
        )

    def to_wire(self) -> dict[str, Any]:
        return {
            "version": LAYOUT_WIRE_VERSION,
            "num_layers": self.num_layers,
            "num_blocks": self.num_blocks,
            "block_size": self.block_size,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "itemsize": self.itemsize,
        }

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> KVLayout:
        _check_version(wire, "KVLayout")
        try:
            return cls(
                num_layers=wire["num_layers"],
                num_blocks=wire["num_blocks"],
                block_size=wire["block_size"],
                kv_heads=wire["kv_heads"],
                head_dim=wire["head_dim"],
                itemsize=wire["itemsize"],
            )
        except KeyError as exc:
            raise LayoutError(f"KVLayout wire dict lacks {exc}") from None


def block_runs(block_ids: Sequence[int]) -> list[tuple[int, int]]:
    """Split ids into maximal runs of consecutive ids, in order: [(start, count), ...]."""
    runs: list[tuple[int, int]] = []
    for block in block_ids:
        if runs and runs[-1][0] + runs[-1][1] == block:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((block, 1))
    return runs


def block_runs_at(ids: list[int]) -> list[tuple[int, int, int]]:
    """Runs of consecutive ids as (first id, position in `ids`, count)."""
    runs, at = [], 0
    for start, count in block_runs(ids):
        runs.append((start, at, count))
        at += count
    return runs


def paired_runs(src_ids: Sequence[int], dst_ids: Sequence[int]) -> list[PairedRun]:
    """Split two equal-length id lists into runs where BOTH sides are consecutive.

    A run can only become one descriptor pair if source and destination are each contiguous,
    so a break on either side starts a new run.
    """
    if len(src_ids) != len(dst_ids):
        raise LayoutError(f"{len(src_ids)} source blocks but {len(dst_ids)} destination blocks")
    runs: list[PairedRun] = []
    for src, dst in zip(src_ids, dst_ids, strict=True):
        if runs:
            src_start, dst_start, count = runs[-1]
            if src_start + count == src and dst_start + count == dst:
                runs[-1] = (src_start, dst_start, count + 1)
                continue
        runs.append((src, dst, 1))
    return runs


@dataclass(frozen=True)
class KVRegions:
    """Where one process sees a KV cache: the layout plus one base address per layer.

    Addresses are only meaningful in the process that produced them (each process maps shared
    memory at its own address); a peer receives them to name destinations, never to read them.
    """

    layout: KVLayout
    layer_addrs: tuple[int, ...]
    device: str = "cpu"
    device_id: int = 0

    def __post_init__(self) -> None:
        if len(self.layer_addrs) != self.layout.num_layers:
            raise LayoutError(
                f"{len(self.layer_addrs)} layer addresses for {self.layout.num_layers} layers"
            )
        if self.device not in DEVICE_KINDS:
            raise LayoutError(f"device must be one of {DEVICE_KINDS}, got {self.device!r}")
        if any(not isinstance(a, int) or a <= 0 for a in self.layer_addrs):
            raise LayoutError("layer addresses must be positive ints")

    @property
    def mem_type(self) -> str:
        """NIXL memory type name for these regions."""
        return "DRAM" if self.device == "cpu" else "VRAM"

    def layer_desc(self, layer: int) -> Desc:
        """The whole layer tensor: what gets registered once at start-up."""
        self._check_layer(layer)
        return (self.layer_addrs[layer], self.layout.layer_nbytes, self.device_id)

    def run_desc(self, layer: int, start: int, count: int) -> Desc:
        """One descriptor covering blocks ``start .. start+count-1`` of ``layer``."""
        self._check_layer(layer)
        if count <= 0 or start < 0 or start + count > self.layout.num_blocks:
            raise LayoutError(
                f"blocks {start}..{start + count - 1} outside 0..{self.layout.num_blocks - 1}"
            )
        nbytes = self.layout.block_nbytes
        return (self.layer_addrs[layer] + start * nbytes, count * nbytes, self.device_id)

    def block_descs(self, layer: int, block_ids: Sequence[int]) -> list[Desc]:
        """Descriptors for ``block_ids`` of ``layer``, consecutive ids coalesced."""
        return [self.run_desc(layer, start, count) for start, count in block_runs(block_ids)]

    def contains(self, layer: int, addr: int, nbytes: int) -> bool:
        """Whether [addr, addr+nbytes) lies inside ``layer``'s tensor.

        Lets a receiver check a peer-supplied destination before writing to it.
        """
        if not 0 <= layer < self.layout.num_layers or nbytes <= 0:
            return False
        base = self.layer_addrs[layer]
        return base <= addr and addr + nbytes <= base + self.layout.layer_nbytes

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.layout.num_layers:
            raise LayoutError(f"layer {layer} outside 0..{self.layout.num_layers - 1}")

    def to_wire(self) -> dict[str, Any]:
        return {
            "version": LAYOUT_WIRE_VERSION,
            "layout": self.layout.to_wire(),
            "layer_addrs": list(self.layer_addrs),
            "device": self.device,
            "device_id": self.device_id,
        }

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> KVRegions:
        _check_version(wire, "KVRegions")
        try:
            return cls(
                layout=KVLayout.from_wire(wire["layout"]),
                layer_addrs=tuple(wire["layer_addrs"]),
                device=wire["device"],
                device_id=wire["device_id"],
            )
        except KeyError as exc:
            raise LayoutError(f"KVRegions wire dict lacks {exc}") from None


def paired_block_descs(
    src: KVRegions,
    src_layer: int,
    src_ids: Sequence[int],
    dst: KVRegions,
    dst_layer: int,
    dst_ids: Sequence[int],
) -> tuple[list[Desc], list[Desc]]:
    """Matched source and destination descriptor lists, element i of one pairs with i of the other:
    one per run of blocks consecutive on both sides (`paired_runs`). LayoutError as
    `paired_run_rows` says, or for a layer out of range."""
    src._check_layer(src_layer)
    dst._check_layer(dst_layer)
    src_off, dst_off, nbytes = paired_run_rows(src.layout, src_ids, dst.layout, dst_ids)
    src_addrs = (src.layer_addrs[src_layer] + src_off).tolist()
    dst_addrs = (dst.layer_addrs[dst_layer] + dst_off).tolist()
    lengths = nbytes.tolist()
    src_descs = list(zip(src_addrs, lengths, repeat(src.device_id)))
    dst_descs = list(zip(dst_addrs, lengths, repeat(dst.device_id)))
    return src_descs, dst_descs


def block_ids_array(ids: Sequence[int] | np.ndarray, layout: KVLayout) -> np.ndarray:
    """Block ids as int64, LayoutError for one outside ``layout``'s blocks."""
    array = np.asarray(ids, dtype=np.int64).reshape(-1)
    bad = array[(array < 0) | (array >= layout.num_blocks)]
    if bad.size:
        raise LayoutError(f"blocks {bad[0]}..{bad[0]} outside 0..{layout.num_blocks - 1}")
    return array


def checked_pair(
    src: KVLayout, src_ids: Sequence[int], dst: KVLayout, dst_ids: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Both id lists as int64 arrays, LayoutError for mismatched lengths, out-of-range ids or
    repeated destination ids (a repeated destination would make the result depend on write
    order)."""
    if len(src_ids) != len(dst_ids):
        raise LayoutError(f"{len(src_ids)} source blocks but {len(dst_ids)} destination blocks")
    s, d = block_ids_array(src_ids, src), block_ids_array(dst_ids, dst)
    if np.unique(d).size != d.size:
        raise LayoutError("destination block ids repeat")
    return s, d


def paired_run_rows(
    src: KVLayout, src_ids: Sequence[int], dst: KVLayout, dst_ids: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Whole blocks ``src_ids`` onto ``dst_ids``, one row per run of blocks consecutive on both
    sides: (source offset, destination offset, bytes), offsets from the layer's base. The same
    for every layer, so a request plans them once (cache_transfer/write_plan.py).

    Raises LayoutError for mismatched geometry or as `checked_pair` says. Vectorized: a prompt of
    scattered blocks has one run per block.
    """
    if not src.block_compatible(dst):
        raise LayoutError(f"block geometry differs: {src} vs {dst}")
    s, d = checked_pair(src, src_ids, dst, dst_ids)
    if not s.size:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    breaks = np.flatnonzero((np.diff(s) != 1) | (np.diff(d) != 1)) + 1
    starts = np.concatenate(([0], breaks))
    nbytes = np.diff(np.append(starts, s.size)) * src.block_nbytes
    return s[starts] * src.block_nbytes, d[starts] * dst.block_nbytes, nbytes


def _check_version(wire: dict[str, Any], what: str) -> None:
    if not isinstance(wire, dict):
        raise LayoutError(f"{what} wire form must be a dict, got {type(wire).__name__}")
    if wire.get("version") != LAYOUT_WIRE_VERSION:
        raise LayoutError(
            f"{what} wire version {wire.get('version')!r}, expected {LAYOUT_WIRE_VERSION}"
        )
