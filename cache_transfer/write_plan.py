"""Write plans: a request's KV descriptors planned once, written layer after layer.

Why. The cache messager writes a request's blocks once per layer, and the blocks -- so the runs
they merge into, and every head slice between tensor-parallel sizes -- are the same in every
layer: only the layer's base address differs. Building descriptor lists of Python tuples for
every layer cost the messager 0.1-0.6 ms per layer of a 4k prompt, more than the copy itself on
a GPU (benchmarks/results/gpu_h200_local_transfer.md).

What. A `WritePlan` holds a write's rows once, as int64 arrays of offsets from the layer bases
(`head_slice_rows` per head route, concatenated); `descs(src_layer, dst_layer)` adds one layer's
bases -- one numpy add per route -- and returns [N, 3] int64 arrays (address, bytes, device id)
that a backend hands on without a Python object per descriptor: NIXL's `get_xfer_descs` takes
the array, the local backend's copy kernel takes its columns. A plan is tied to the peer
connection it was made for (`planned_for`); the backend plans again if the peer reconnected.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from cache_transfer.layout import Desc, LayoutError
from cache_transfer.tp_layout import HeadRoute, RankKV, head_slice_rows

ADDR, NBYTES, DEVICE = 0, 1, 2  # the columns of a descriptor array


@dataclass(frozen=True)
class _Segment:
    """Rows of one head route: they take their layer bases from these two ranks."""

    src_rank: int
    dst_rank: int
    rows: slice


@dataclass(eq=False)
class WritePlan:
    """One write's descriptors for any layer; see the module docstring."""

    peer: str
    src_ids: np.ndarray
    dst_ids: np.ndarray
    src_rows: np.ndarray  # [N, 3]: offset from the rank's layer base, bytes, device id
    dst_rows: np.ndarray
    segments: tuple[_Segment, ...]
    src_bases: np.ndarray  # [source ranks, layers]: layer base addresses
    dst_bases: np.ndarray  # [destination ranks, layers], as the peer published them
    planned_for: object = None  # backend-private: the peer connection the rows are valid for

    @cached_property
    def nbytes(self) -> int:
        return int(self.src_rows[:, NBYTES].sum())

    @property
    def num_descs(self) -> int:
        return len(self.src_rows)

    def descs(
        self, src_layer: int, dst_layer: int, dst_bases: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Source and destination descriptors ([N, 3] int64) for one layer; `dst_bases` replaces
        the peer's published bases (the local backend's own mapping of the peer's memory)."""
        dst_bases = self.dst_bases if dst_bases is None else dst_bases
        check_layer(src_layer, self.src_bases)
        check_layer(dst_layer, dst_bases)
        src, dst = self.src_rows.copy(), self.dst_rows.copy()
        for segment in self.segments:
            src[segment.rows, ADDR] += self.src_bases[segment.src_rank, src_layer]
            dst[segment.rows, ADDR] += dst_bases[segment.dst_rank, dst_layer]
        return src, dst

    @cached_property
    def _columns(self) -> np.ndarray:
        """[3, N]: source offset, destination offset, bytes (the rows, column by column)."""
        return np.stack([self.src_rows[:, ADDR], self.dst_rows[:, ADDR], self.src_rows[:, NBYTES]])

    @cached_property
    def aligned8(self) -> bool:
        """Whether every offset and length is a multiple of 8 bytes (a device copy's word)."""
        return not (self._columns % 8).any()

    def columns(self, src_layer: int, dst_layer: int, dst_bases: np.ndarray) -> np.ndarray:
        """One layer's descriptors as [3, N] int64 (source address, destination address, bytes),
        destinations at `dst_bases`; the layers were checked by the caller. The local backend's
        copy kernel takes this table as it is: no per-layer reshaping."""
        table = self._columns.copy()
        for segment in self.segments:
            table[0, segment.rows] += self.src_bases[segment.src_rank, src_layer]
            table[1, segment.rows] += dst_bases[segment.dst_rank, dst_layer]
        return table

    def columns_of_layers(self, layers: Sequence[int], dst_bases: np.ndarray) -> np.ndarray:
        """`columns` of every layer in `layers` (source and destination layer alike), layer
        after layer: [3, len(layers) * N], one broadcast add per route."""
        picked = np.asarray(layers, dtype=np.int64)
        count = self.num_descs
        table = np.tile(self._columns, (1, len(picked))).reshape(3, len(picked), count)
        for segment in self.segments:
            table[0, :, segment.rows] += self.src_bases[segment.src_rank, picked][:, None]
            table[1, :, segment.rows] += dst_bases[segment.dst_rank, picked][:, None]
        return table.reshape(3, len(picked) * count)

    def descs_of_layers(self, layers: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """`descs` of every layer in `layers`, concatenated (one transfer can carry them)."""
        table = self.columns_of_layers(layers, self.dst_bases)
        src, dst = np.empty((table.shape[1], 3), np.int64), np.empty((table.shape[1], 3), np.int64)
        src[:, ADDR], dst[:, ADDR] = table[0], table[1]
        src[:, NBYTES] = dst[:, NBYTES] = table[2]
        src[:, DEVICE] = np.tile(self.src_rows[:, DEVICE], len(layers))
        dst[:, DEVICE] = np.tile(self.dst_rows[:, DEVICE], len(layers))
        return src, dst


def check_layer(layer: int, bases: np.ndarray) -> None:
    if not 0 <= layer < bases.shape[1]:
        raise LayoutError(f"layer {layer} outside 0..{bases.shape[1] - 1}")


def layer_bases(ranks: Sequence[RankKV]) -> np.ndarray:
    """[ranks, layers] int64: every rank's layer base addresses."""
    return np.array([rank.regions.layer_addrs for rank in ranks], dtype=np.int64)


def plan_write(
    peer: str,
    src_ranks: Sequence[RankKV],
    dst_ranks: Sequence[RankKV],
    routes: Sequence[HeadRoute],
    src_ids: Sequence[int] | np.ndarray,
    dst_ids: Sequence[int] | np.ndarray,
    planned_for: object = None,
) -> WritePlan:
    """Every route's rows for blocks `src_ids` onto `dst_ids`, concatenated (one write carries
    them all); LayoutError for ids a write cannot take."""
    src_ids = np.asarray(src_ids, dtype=np.int64).reshape(-1)
    dst_ids = np.asarray(dst_ids, dtype=np.int64).reshape(-1)
    src_parts, dst_parts, segments, at = [], [], [], 0
    for route in routes:
        s, d = src_ranks[route.src_rank], dst_ranks[route.dst_rank]
        src_off, dst_off, nbytes = head_slice_rows(
            s.regions.layout, s.heads, src_ids, d.regions.layout, d.heads, dst_ids, route.heads
        )
        src_parts.append(_rows(src_off, nbytes, s.regions.device_id))
        dst_parts.append(_rows(dst_off, nbytes, d.regions.device_id))
        segments.append(_Segment(route.src_rank, route.dst_rank, slice(at, at + len(nbytes))))
        at += len(nbytes)
    empty = np.zeros((0, 3), dtype=np.int64)
    return WritePlan(
        peer,
        src_ids,
        dst_ids,
        np.concatenate(src_parts) if src_parts else empty,
        np.concatenate(dst_parts) if dst_parts else empty,
        tuple(segments),
        layer_bases(src_ranks),
        layer_bases(dst_ranks),
        planned_for,
    )


def _rows(offsets: np.ndarray, nbytes: np.ndarray, device_id: int) -> np.ndarray:
    rows = np.empty((len(offsets), 3), dtype=np.int64)
    rows[:, ADDR], rows[:, NBYTES], rows[:, DEVICE] = offsets, nbytes, device_id
    return rows


def desc_array(descs: Sequence[Desc] | np.ndarray) -> np.ndarray:
    """Descriptors as an [N, 3] int64 array (address, bytes, device id)."""
    return np.asarray(descs, dtype=np.int64).reshape(-1, 3)


def check_explicit_descs(
    src: np.ndarray, dst: np.ndarray, sources: Sequence[Desc], peer: Sequence[RankKV], layer: int
) -> None:
    """LayoutError unless every source lies in one of `sources` (registered memory) and every
    destination in layer `layer` of one of the peer's ranks, pairwise of equal sizes."""
    if len(src) != len(dst):
        raise LayoutError(f"{len(src)} source but {len(dst)} destination descs")
    unequal = np.flatnonzero(src[:, NBYTES] != dst[:, NBYTES])
    if unequal.size:
        i = unequal[0]
        raise LayoutError(f"a {src[i, NBYTES]}-byte source paired with {dst[i, NBYTES]} bytes")
    regions = desc_array(sources)
    outside = np.flatnonzero(~_inside_any(src, regions[:, ADDR], regions[:, NBYTES]))
    if outside.size:
        addr, nbytes = src[outside[0], :2]
        raise LayoutError(f"source {addr:#x}+{nbytes} is not registered memory")
    if not 0 <= layer < peer[0].regions.layout.num_layers:
        starts, sizes = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    else:
        starts = layer_bases(peer)[:, layer]
        sizes = np.array([rank.regions.layout.layer_nbytes for rank in peer], dtype=np.int64)
    outside = np.flatnonzero(~_inside_any(dst, starts, sizes) | (dst[:, NBYTES] <= 0))
    if outside.size:
        addr, nbytes = dst[outside[0], :2]
        raise LayoutError(f"destination {addr:#x}+{nbytes} is not in layer {layer}")


def _inside_any(descs: np.ndarray, starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Per descriptor, whether it lies inside one of the regions (start, size)."""
    begin, end = descs[:, ADDR, None], descs[:, ADDR, None] + descs[:, NBYTES, None]
    return ((starts <= begin) & (end <= starts + sizes)).any(axis=1)
