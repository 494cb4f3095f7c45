"""Staged writes: KV transfer between instances of different tensor-parallel sizes.

Why. In the cache layout `[blocks, 2, block_size, kv_heads, head_dim]` the heads one rank holds
of one (K or V, token) are one short run inside the block. When a decode rank holds other heads
than the prefill rank it gets them from, describing that slice directly costs 2 * block_size
descriptors per block and route (tp_layout.head_slice_descs), and UCX pays per descriptor: 12-40x
the time of equal sizes on CPU (benchmarks/results/tp_transfer_cpu.md).

What. `StagedWriter` stands between the cache messager and its backend, with the backend's
write/plan/write_plan/poll/release/wait. For each "staged" decode rank (one whose heads come
from a prefill rank holding other heads) it gathers, with torch so the same code runs on CUDA
tensors, the rank's heads of the written blocks from every prefill rank holding them into a
staging buffer laid out exactly as that decode rank's blocks (`[n, 2, block_size, d_heads,
head_dim]`), and writes it whole onto the decode rank's blocks: one descriptor per run of
consecutive destination blocks.
Decode ranks that hold the same heads as their prefill rank (equal sizes) get whole blocks
straight from the prefill cache, as before, in the same backend write; a peer with no staged
rank is written exactly as without this class (`plan` is the backend's own plan).

Memory. One staging buffer per writer, `capacity` bytes (`transfer.staging_buffer_mb`), on the
prefill cache's device, allocated and registered with the backend (`add_local_region`) on the
first staged write -- never for a messager that only writes between equal sizes -- and dropped at
`close()` after the backend closed. It is a first-in-first-out ring: each posted piece holds its
slot until the backend reports it finished (or it is released). A write is split into pieces of
at most half the ring, so two are always in flight (double-buffered: a gather waits for the
write before the previous one, never for the previous one). When the ring is full, pieces queue
and are gathered and posted from `poll` (the messager polls every 0.5 ms while writes are in
flight), so `write` never blocks on an earlier write.

Failure. A piece that cannot be gathered or posted, or a posted one that fails, fails its whole
write (its queued pieces are dropped). Releasing a pending write frees its slots at once; if the
backend could not cancel its transfer, that transfer may read slots that get reused, which only
spoils bytes of a write already reported failed.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from cache_transfer.backend import (
    TransferBackend,
    TransferError,
    TransferHandle,
    TransferState,
    poll_until,
)
from cache_transfer.layout import Desc, LayoutError, block_runs_at
from cache_transfer.staging_ring import Slot, StagingRing, aligned
from cache_transfer.tp_layout import HeadRoute, RankKV, check_rank_ids, head_slice_descs
from cache_transfer.write_plan import WritePlan

DEFAULT_STAGING_BYTES = 64 << 20


@dataclass
class _Piece:
    """Some blocks of one write: the gathers filling its slot and the descriptors posting it."""

    nbytes: int  # slot bytes
    gathers: list[tuple[torch.Tensor, int, tuple[int, ...], tuple[slice, ...]]]
    staged: list[tuple[int, int]]  # (offset in the slot, nbytes) per staged destination run
    dst: list[Desc]  # staged destinations, then the direct ones
    direct_src: list[Desc]


@dataclass(frozen=True)
class _StagedPlan:
    """`StagedWriter.plan` for a peer with a staged rank."""

    peer: str
    src_ids: list[int]
    dst_ids: list[int]


@dataclass
class _Write:
    handle: TransferHandle
    dst_layer: int
    pieces: deque[_Piece]
    posted: list[tuple[TransferHandle, Slot]] = field(default_factory=list)
    error: str = ""


class StagedWriter:
    """The cache messager's write path over `backend` (registered with the prefill ranks whose
    per-layer tensors are `sources`, rank order); see the module docstring."""

    def __init__(
        self,
        backend: TransferBackend,
        sources: Sequence[Sequence[torch.Tensor]],
        capacity: int = DEFAULT_STAGING_BYTES,
    ) -> None:
        ranks = backend.registered_ranks()
        if len(sources) != len(ranks):
            raise ValueError(f"{len(sources)} source ranks for {len(ranks)} registered")
        for rank, layers in zip(ranks, sources, strict=True):
            addrs = tuple(t.data_ptr() for t in layers)
            if addrs != rank.regions.layer_addrs:
                raise ValueError("source tensors are not the registered KV regions")
        self.backend = backend
        self._ranks = ranks
        # per rank, per layer: [blocks, 2, block_size, heads, head_dim * itemsize] bytes
        self._sources = [[t.view(torch.uint8) for t in layers] for layers in sources]
        self._device = self._sources[0][0].device
        self._ring = StagingRing(capacity)
        self._buffer: torch.Tensor | None = None
        self._queue: deque[_Write] = deque()  # writes with pieces not yet posted, oldest first
        self._writes: dict[int, _Write] = {}
        self._inflight: list[tuple[TransferHandle, Slot]] = []
        # staging_waits: pieces that had to wait for room in the ring
        self._counters = {"staged_writes": 0, "staged_pieces": 0, "staging_waits": 0}
        self._waiting: _Piece | None = None  # the piece counted as waiting last
        self._lock = threading.RLock()

    # -- the backend's interface -------------------------------------------------------------

    def connect(self, peer_info: dict[str, Any], deadline: float) -> str:
        return self.backend.connect(peer_info, deadline)

    def disconnect(self, peer: str) -> None:
        self.backend.disconnect(peer)

    def write(
        self,
        peer: str,
        src_layer: int,
        src_block_ids: Sequence[int],
        dst_layer: int,
        dst_block_ids: Sequence[int],
    ) -> TransferHandle:
        d_ranks, routes = self.backend.peer_plan(peer)
        staged = [route for route in routes if not self._direct(route, d_ranks)]
        if not staged:
            return self.backend.write(peer, src_layer, src_block_ids, dst_layer, dst_block_ids)
        direct = [route for route in routes if route not in staged]
        src_ids, dst_ids = list(src_block_ids), list(dst_block_ids)
        check_rank_ids(self._ranks, src_layer, src_ids, d_ranks, dst_layer, dst_ids)
        with self._lock:
            pieces = self._pieces(d_ranks, staged, direct, src_layer, src_ids, dst_layer, dst_ids)
            nbytes = sum(n for p in pieces for _, n in p.staged) + sum(
                d[1] for p in pieces for d in p.direct_src
            )
            descs = sum(len(p.dst) for p in pieces)
            handle = TransferHandle(peer=peer, nbytes=nbytes, num_descs=descs)
            if not pieces:
                handle.state = TransferState.DONE
                return handle
            write = _Write(handle, dst_layer, deque(pieces))
            self._writes[handle.id] = write
            self._queue.append(write)
            self._counters["staged_writes"] += 1
            self._pump()
            self._settle(write)
            return handle

    def plan(
        self, peer: str, src_block_ids: Sequence[int], dst_block_ids: Sequence[int]
    ) -> WritePlan | _StagedPlan:
        """The backend's plan for a peer with no staged rank; otherwise the ids, staged again
        for every layer (the gathers read each layer's own tensors)."""
        d_ranks, routes = self.backend.peer_plan(peer)
        if all(self._direct(route, d_ranks) for route in routes):
            return self.backend.plan(peer, src_block_ids, dst_block_ids)
        src_ids, dst_ids = list(src_block_ids), list(dst_block_ids)
        check_rank_ids(self._ranks, 0, src_ids, d_ranks, 0, dst_ids)
        return _StagedPlan(peer, src_ids, dst_ids)

    def write_plan(
        self, plan: WritePlan | _StagedPlan, src_layer: int, dst_layer: int
    ) -> TransferHandle:
        if isinstance(plan, WritePlan):
            return self.backend.write_plan(plan, src_layer, dst_layer)
        return self.write(plan.peer, src_layer, plan.src_ids, dst_layer, plan.dst_ids)

    def write_layers(
        self, plan: WritePlan | _StagedPlan, layers: Sequence[int]
    ) -> list[TransferHandle]:
        """Several layers' writes (each onto itself): the backend's, or staged one by one."""
        if isinstance(plan, WritePlan):
            return self.backend.write_layers(plan, layers)
        return [self.write_plan(plan, layer, layer) for layer in layers]

    def poll(self, handle: TransferHandle) -> TransferState:
        with self._lock:
            write = self._writes.get(handle.id)
            if write is None:
                return self.backend.poll(handle)
            self._pump()
            self._settle(write)
            return handle.state

    def wait(self, handle: TransferHandle, deadline: float) -> TransferState:
        if handle.id not in self._writes:
            return self.backend.wait(handle, deadline)
        return poll_until(self.poll, handle, deadline)

    def release(self, handle: TransferHandle) -> None:
        with self._lock:
            write = self._writes.pop(handle.id, None)
            if write is None:
                self.backend.release(handle)
                return
            if handle.state is TransferState.PENDING:
                self._fail(write, "released while pending")
                handle.state, handle.error = TransferState.FAILED, write.error
            for posted, slot in write.posted:
                self.backend.release(posted)
                slot.done = True
            self._inflight = [(h, s) for h, s in self._inflight if not s.done]
            handle.released = True

    def stats(self) -> dict[str, int]:
        with self._lock:
            staging = {"staging_bytes": 0 if self._buffer is None else self._ring.capacity}
            return {**self.backend.stats(), **self._counters, **staging}

    def close(self) -> None:
        """Close the backend (it releases every transfer), then drop the staging buffer."""
        with self._lock:
            for write in list(self._writes.values()):
                self._fail(write, "backend closed")
                self._settle(write)
            self.backend.close()
            self._buffer = None
            self._sources = []  # views of the prefill cache: its mapping may go now

    # -- planning ----------------------------------------------------------------------------

    def _direct(self, route: HeadRoute, d_ranks: list[RankKV]) -> bool:
        held = self._ranks[route.src_rank].heads
        return held == d_ranks[route.dst_rank].heads == route.heads

    def _pieces(
        self,
        d_ranks: list[RankKV],
        staged: list[HeadRoute],
        direct: list[HeadRoute],
        src_layer: int,
        src_ids: list[int],
        dst_layer: int,
        dst_ids: list[int],
    ) -> list[_Piece]:
        """The write's blocks in pieces of at most half the ring."""
        staged_ranks = sorted({route.dst_rank for route in staged})
        per_block = sum(aligned(d_ranks[d].regions.layout.block_nbytes) for d in staged_ranks)
        if per_block > self._ring.capacity // 2:
            raise TransferError(
                f"a {self._ring.capacity}-byte staging buffer is too small for blocks of "
                f"{per_block} bytes (transfer.staging_buffer_mb)"
            )
        step = self._ring.capacity // 2 // per_block
        pieces = []
        for at in range(0, len(src_ids), step):
            piece = _Piece(0, [], [], [], [])
            src, dst = src_ids[at : at + step], dst_ids[at : at + step]
            runs = block_runs_at(src), block_runs_at(dst)
            for d in staged_ranks:
                routes = [route for route in staged if route.dst_rank == d]
                self._stage_rank(piece, d_ranks[d], routes, src_layer, dst_layer, len(src), runs)
            for route in direct:
                s, d = self._ranks[route.src_rank], d_ranks[route.dst_rank]
                src_descs, dst_descs = head_slice_descs(
                    s.regions, s.heads, src_layer, src, d.regions, d.heads, dst_layer, dst, s.heads
                )
                piece.direct_src += src_descs
                piece.dst += dst_descs
            pieces.append(piece)
        return pieces

    def _stage_rank(
        self,
        piece: _Piece,
        rank: RankKV,
        routes: list[HeadRoute],
        src_layer: int,
        dst_layer: int,
        count: int,
        runs: tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]],
    ) -> None:
        """Add one decode rank's part of `piece` (`count` blocks, their source and destination
        `block_runs_at`): gathers of every route's heads into the rank's block layout at the end of
        the slot, and the runs that write it."""
        layout = rank.regions.layout
        base = piece.nbytes
        shape = (count, 2, layout.block_size, layout.kv_heads, -1)
        for route in routes:
            held = self._ranks[route.src_rank].heads
            src_heads = slice(route.heads.start - held.start, route.heads.end - held.start)
            dst_heads = slice(
                route.heads.start - rank.heads.start, route.heads.end - rank.heads.start
            )
            layer = self._sources[route.src_rank][src_layer]
            for start, at, n in runs[0]:
                view = layer[start : start + n, :, :, src_heads]
                index = (slice(at, at + n), slice(None), slice(None), dst_heads)
                piece.gathers.append((view, base, shape, index))
        for start, at, n in runs[1]:
            piece.staged.append((base + at * layout.block_nbytes, n * layout.block_nbytes))
            piece.dst.append(rank.regions.run_desc(dst_layer, start, n))
        piece.nbytes = base + aligned(count * layout.block_nbytes)

    # -- moving ------------------------------------------------------------------------------

    def _pump(self) -> None:
        """Gather and post queued pieces while slots fit, freeing those of finished pieces."""
        self._reclaim()
        while self._queue:
            write = self._queue[0]
            slot = self._ring.alloc(write.pieces[0].nbytes)
            if slot is None:
                if self._reclaim():  # a piece posted just now may be done already (CPU CMA)
                    continue
                if self._waiting is not write.pieces[0]:
                    self._waiting = write.pieces[0]
                    self._counters["staging_waits"] += 1
                return
            piece = write.pieces.popleft()
            if not write.pieces:
                self._queue.popleft()
            try:
                posted = self._post(write, piece, slot)
            except (TransferError, LayoutError, RuntimeError) as exc:  # torch raises RuntimeError
                slot.done = True
                self._fail(write, f"staged write failed: {exc}")
                continue
            write.posted.append((posted, slot))
            self._inflight.append((posted, slot))
            self._counters["staged_pieces"] += 1

    def _reclaim(self) -> bool:
        """Mark the slots of finished pieces free; whether any was."""
        for posted, slot in self._inflight:
            slot.done = self.backend.poll(posted) >= TransferState.DONE
        count = len(self._inflight)
        self._inflight = [(h, s) for h, s in self._inflight if not s.done]
        return len(self._inflight) < count

    def _post(self, write: _Write, piece: _Piece, slot: Slot) -> TransferHandle:
        buffer = self._staging()
        for view, at, shape, index in piece.gathers:
            start = slot.offset + at
            size = math.prod(shape[:-1]) * view.shape[-1]
            # [n, 2, block_size, d_heads, head_dim * itemsize]: the decode rank's blocks
            buffer[start : start + size].view(shape)[index].copy_(view)
        if buffer.is_cuda:  # the write reads the buffer outside torch's stream order
            for device in {view.device for view, *_ in piece.gathers}:
                torch.cuda.synchronize(device)
        addr = buffer.data_ptr() + slot.offset
        index = self._device.index or 0
        src = [(addr + at, n, index) for at, n in piece.staged] + piece.direct_src
        return self.backend.write_descs(write.handle.peer, src, piece.dst, write.dst_layer)

    def _staging(self) -> torch.Tensor:
        """The staging buffer, allocated and registered on first use."""
        if self._buffer is None:
            buffer = torch.empty(self._ring.capacity, dtype=torch.uint8, device=self._device)
            self.backend.add_local_region(
                (buffer.data_ptr(), buffer.numel(), self._device.index or 0)
            )
            self._buffer = buffer
        return self._buffer

    def _settle(self, write: _Write) -> None:
        handle = write.handle
        if handle.state is not TransferState.PENDING:
            return
        for posted, _ in write.posted:
            if posted.state is TransferState.FAILED:
                self._fail(write, posted.error or "write failed")
        if write.error:
            handle.state, handle.error = TransferState.FAILED, write.error
        elif not write.pieces and all(p.state is TransferState.DONE for p, _ in write.posted):
            handle.state = TransferState.DONE

    def _fail(self, write: _Write, error: str) -> None:
        write.error = write.error or error
        write.pieces.clear()
        if write in self._queue:
            self._queue.remove(write)
