"""The transfer-backend interface: how KV blocks move from a prefill to a decode instance.

Contract (every backend, NIXL and TCP alike):

Roles. A backend object belongs to one process and has a unique ``agent_name``. Either side may
be source or target; in pdserve the cache messager of a prefill instance is the source and the
decode instance is the target.

Start-up. ``register(regions)`` is called once with the process's own view of its KV cache
(the memory must stay mapped until ``close()``): one ``KVRegions``, or under tensor parallelism
one ``RankKV`` per rank (its regions and the KV heads they hold). The target then publishes
``endpoint_info()``: a plain msgpack-able dict ``{"version", "backend", "agent", "ranks", ...}``
plus what the backend needs to reach it (NIXL: the agent metadata bytes; TCP: a zmq address and
a session id). The source passes that dict to ``connect(peer_info, deadline)``, which pairs its
ranks with the peer's (cache_transfer/tp_layout.py: each destination rank's heads come from one
source rank) and returns the peer name used by every later call. Nothing is pickled.

Writes. ``write(peer, src_layer, src_block_ids, dst_layer, dst_block_ids)`` starts copying the
listed source blocks onto the listed destination blocks (element i onto element i; under tensor
parallelism each rank's head slice of a block into the rank that holds those heads) and returns
a ``TransferHandle`` without waiting for completion (a backend may still do some copying inside
the call: NIXL over UCX's CMA transport on a CPU host copies during the post). The source blocks
must not change until the handle is finished. Invalid ids raise ``LayoutError`` before anything
is sent; a peer that is unknown, lost, or refuses the write raises ``TransferError``.
``poll(handle)`` never blocks; ``wait(handle, deadline)`` blocks until DONE or FAILED and raises
``TransferTimeout`` at the deadline. DONE means the bytes are in the target's memory. FAILED
means they may be partly written: the target must not hand those blocks to anyone else until
its own lease on them expires. ``release(handle)`` frees backend resources; call it once per
handle on every path (``close()`` releases whatever is left).

``plan(peer, src_block_ids, dst_block_ids)`` then ``write_plan(plan, src_layer, dst_layer)`` is
``write`` in two steps, for a caller that writes the same blocks in every layer (the cache
messager): the descriptors are planned once, as numpy rows of offsets from the layer bases, and
each layer's write adds its bases (cache_transfer/write_plan.py). Invalid ids raise
``LayoutError`` from ``plan``, a bad layer from ``write_plan``. ``write_layers(plan, layers)``
writes several layers (each onto itself) as one transfer where the backend can (NIXL, local),
else one per layer; it returns the handles.

``write_descs(peer, src_descs, dst_descs, dst_layer)`` is the same write from explicit matched
descriptors: each source one inside this side's registered memory (its ranks' layers, or a
region added with ``add_local_region``, such as a staging buffer), each destination inside one
of the peer's ranks' layer ``dst_layer``; anything else raises ``LayoutError``
(cache_transfer/staging.py gathers head slices into a staging buffer and writes it this way).

Completion is not signalled through the backend: because DONE means the bytes are in the
target's memory, the source tells the target "KV complete" with a control message of its own
(pdserve's ``KvComplete``) sent after the last DONE.

Deadlines are absolute ``time.monotonic()`` values (see ``deadline_in``), so a caller can share
one deadline across many waits. All public methods are thread-safe. ``stats()`` returns counters
for metrics.

Shutdown. ``disconnect(peer)`` forgets one peer (its pending writes become FAILED); ``close()``
releases all handles, disconnects all peers and deregisters memory. Backends are context
managers.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar

import numpy as np

from cache_transfer.handles import (
    ENDPOINT_VERSION,
    TransferError,
    TransferHandle,
    TransferState,
    TransferTimeout,
    deadline_in,
    endpoint_field,
    parse_endpoint_info,
    poll_until,
    remaining,
)
from cache_transfer.layout import Desc, KVRegions, LayoutError
from cache_transfer.tp_layout import HeadRoute, RankKV, check_ranks, plan_routes
from cache_transfer.write_plan import (
    WritePlan,
    check_explicit_descs,
    check_layer,
    desc_array,
    plan_write,
)

__all__ = [  # the handles' vocabulary is imported from here by the backends and their users
    "ENDPOINT_VERSION",
    "TransferBackend",
    "TransferError",
    "TransferHandle",
    "TransferState",
    "TransferTimeout",
    "WritePlan",
    "deadline_in",
    "endpoint_field",
    "remaining",
]


@dataclass
class _Peer:
    ranks: list[RankKV]
    routes: list[HeadRoute]


class TransferBackend(ABC):
    """See the module docstring for the contract.

    The public methods here hold the shared logic (argument checks, descriptor planning, peer
    bookkeeping, locking); a backend fills in the ``_``-prefixed hooks, which are always called
    with ``self._lock`` held.
    """

    backend_name: ClassVar[str] = ""

    def __init__(self, agent_name: str) -> None:
        if not agent_name:
            raise ValueError("agent_name must be non-empty")
        self.agent_name = agent_name
        # One lock for all public methods: NIXL agents without a listener thread are built
        # unsynchronized and zmq sockets must not be used from two threads at once.
        self._lock = threading.RLock()
        self._ranks: list[RankKV] | None = None
        self._sources: list[Desc] = []  # registered memory: the ranks' layers, staging buffers
        self._peers: dict[str, _Peer] = {}
        self._counters = {"writes": 0, "failed": 0}

    # -- hooks ----------------------------------------------------------------------------

    @abstractmethod
    def _register(self, ranks: list[RankKV]) -> None: ...

    @abstractmethod
    def _endpoint_extra(self) -> dict[str, Any]:
        """Backend-specific fields of ``endpoint_info``."""

    def _dial(self, peer: str, peer_info: dict[str, Any], deadline: float) -> Any:
        """The slow part of connecting, called WITHOUT the lock so that writes to other peers go
        on meanwhile; its result goes to ``_open_peer``. Default: nothing to do."""
        return None

    def _abandon_dial(self, dialed: Any) -> None:
        """Undo ``_dial`` when the connection is not kept (the backend closed meanwhile)."""
        return None

    @abstractmethod
    def _open_peer(self, peer: str, peer_info: dict[str, Any], dialed: Any) -> None: ...

    @abstractmethod
    def _register_local(self, region: Desc, mem_type: str) -> None:
        """Make ``region`` of this process's memory usable as a write source until ``close()``."""

    @abstractmethod
    def _start_write(
        self, handle: TransferHandle, src: np.ndarray, dst: np.ndarray, dst_layer: int
    ) -> None:
        """Start a non-empty write of descriptor arrays ([N, 3] int64: address, bytes, device
        id); raise TransferError if it cannot start."""

    def _start_planned(
        self, handle: TransferHandle, plan: WritePlan, src_layer: int, dst_layer: int
    ) -> None:
        """Start a non-empty planned write; default: one layer's descriptors to `_start_write`."""
        src, dst = plan.descs(src_layer, dst_layer)
        self._start_write(handle, src, dst, dst_layer)

    # True: `_start_layers` may start one transfer whose destinations span several layers.
    writes_across_layers: ClassVar[bool] = False

    def _start_layers(self, handle: TransferHandle, plan: WritePlan, layers: Sequence[int]) -> None:
        """Start several layers' planned writes as one; default: their descriptors concatenated
        to `_start_write` (its `dst_layer` is then the first layer's)."""
        src, dst = plan.descs_of_layers(layers)
        self._start_write(handle, src, dst, layers[0])

    @abstractmethod
    def _close_peer(self, peer: str, reason: str) -> None:
        """Fail the peer's pending writes with ``reason`` and drop its connection."""

    @abstractmethod
    def _close(self) -> None:
        """Release everything ``_register`` set up; peers are already closed."""

    # -- contract -------------------------------------------------------------------------

    def register(self, regions: KVRegions | Sequence[RankKV]) -> None:
        ranks = [RankKV.whole(regions)] if isinstance(regions, KVRegions) else list(regions)
        check_ranks(ranks)
        with self._lock:
            if self._ranks is not None:
                raise TransferError(f"{self.agent_name}: register() called twice")
            self._register(ranks)
            self._ranks = ranks
            self._sources = [
                r.regions.layer_desc(i) for r in ranks for i in range(r.regions.layout.num_layers)
            ]

    def endpoint_info(self) -> dict[str, Any]:
        with self._lock:
            ranks = self._require_registered()
            return {
                "version": ENDPOINT_VERSION,
                "backend": self.backend_name,
                "agent": self.agent_name,
                "ranks": [rank.to_wire() for rank in ranks],
                **self._endpoint_extra(),
            }

    def connect(self, peer_info: dict[str, Any], deadline: float) -> str:
        peer, peer_ranks = parse_endpoint_info(peer_info, self.backend_name)
        with self._lock:
            try:
                routes = plan_routes(self._require_registered(), peer_ranks)
            except LayoutError as exc:
                raise TransferError(f"{peer}: KV caches cannot be paired: {exc}") from exc
        dialed = self._dial(peer, peer_info, deadline)
        with self._lock:
            try:
                self._require_registered()
                if peer in self._peers:
                    self._drop_peer(peer, "peer reconnected")
                self._open_peer(peer, peer_info, dialed)
            except BaseException:
                self._abandon_dial(dialed)
                raise
            self._peers[peer] = _Peer(peer_ranks, routes)
        return peer

    def plan(
        self, peer: str, src_block_ids: Sequence[int], dst_block_ids: Sequence[int]
    ) -> WritePlan:
        """The descriptors of writing these blocks, for any layer (``write_plan``): a caller
        that writes the same blocks in every layer (the cache messager) plans them once."""
        with self._lock:
            ranks = self._require_registered()
            target = self._peers.get(peer)
            if target is None:
                raise TransferError(f"{self.agent_name}: unknown or lost peer {peer!r}")
            return plan_write(
                peer, ranks, target.ranks, target.routes, src_block_ids, dst_block_ids, target
            )

    def write_plan(self, plan: WritePlan, src_layer: int, dst_layer: int) -> TransferHandle:
        """``write`` of the plan's blocks from ``src_layer`` onto ``dst_layer``."""
        with self._lock:
            plan = self._current(plan)
            check_layer(src_layer, plan.src_bases)
            check_layer(dst_layer, plan.dst_bases)
            handle = self._new_handle(plan.peer, plan.nbytes, plan.num_descs)
            self._start(handle, lambda: self._start_planned(handle, plan, src_layer, dst_layer))
            return handle

    def write_layers(self, plan: WritePlan, layers: Sequence[int]) -> list[TransferHandle]:
        """``write_plan`` of every layer in ``layers`` (each onto the same layer), as one transfer
        where the backend can (``writes_across_layers``): a messager round's layers, one post."""
        with self._lock:
            if not self.writes_across_layers or len(layers) < 2:
                return [self.write_plan(plan, layer, layer) for layer in layers]
            plan = self._current(plan)
            for layer in layers:
                check_layer(layer, plan.src_bases)
                check_layer(layer, plan.dst_bases)
            count = len(layers)
            handle = self._new_handle(plan.peer, plan.nbytes * count, plan.num_descs * count)
            self._start(handle, lambda: self._start_layers(handle, plan, layers))
            return [handle]

    def _current(self, plan: WritePlan) -> WritePlan:
        """The plan, or a new one of its blocks if its peer reconnected (its memory may differ)."""
        self._require_registered()
        target = self._peers.get(plan.peer)
        if target is None:
            raise TransferError(f"{self.agent_name}: unknown or lost peer {plan.peer!r}")
        if plan.planned_for is target:
            return plan
        return self.plan(plan.peer, plan.src_ids, plan.dst_ids)

    def write(
        self,
        peer: str,
        src_layer: int,
        src_block_ids: Sequence[int],
        dst_layer: int,
        dst_block_ids: Sequence[int],
    ) -> TransferHandle:
        with self._lock:
            plan = self.plan(peer, src_block_ids, dst_block_ids)
            return self.write_plan(plan, src_layer, dst_layer)

    def write_descs(
        self,
        peer: str,
        src_descs: Sequence[Desc] | np.ndarray,
        dst_descs: Sequence[Desc] | np.ndarray,
        dst_layer: int,
    ) -> TransferHandle:
        with self._lock:
            peer_ranks = self._require_peer(peer)
            src, dst = desc_array(src_descs), desc_array(dst_descs)
            check_explicit_descs(src, dst, self._sources, peer_ranks, dst_layer)
            handle = self._new_handle(peer, int(src[:, 1].sum()), len(src))
            self._start(handle, lambda: self._start_write(handle, src, dst, dst_layer))
            return handle

    def _new_handle(self, peer: str, nbytes: int, num_descs: int) -> TransferHandle:
        handle = TransferHandle(peer=peer, nbytes=nbytes, num_descs=num_descs)
        self._counters["writes"] += 1
        if not num_descs:
            handle.state = TransferState.DONE
        return handle

    def _start(self, handle: TransferHandle, start: Callable[[], None]) -> None:
        """Run a start hook for a handle with something to move, counting a refusal."""
        if handle.state is TransferState.PENDING:
            try:
                start()
            except TransferError:
                self._counters["failed"] += 1
                raise

    def add_local_region(self, region: Desc) -> None:
        """Register one more region of this process's memory (of the ranks' memory kind) as a
        write source for ``write_descs``, until ``close()``: a staging buffer, registered once."""
        with self._lock:
            ranks = self._require_registered()
            self._register_local(region, ranks[0].regions.mem_type)
            self._sources.append(region)

    def registered_ranks(self) -> list[RankKV]:
        with self._lock:
            return list(self._require_registered())

    def peer_plan(self, peer: str) -> tuple[list[RankKV], list[HeadRoute]]:
        """A connected peer's ranks and the routes from this side's ranks to them."""
        with self._lock:
            self._require_peer(peer)
            return self._peers[peer].ranks, self._peers[peer].routes

    @abstractmethod
    def poll(self, handle: TransferHandle) -> TransferState: ...

    @abstractmethod
    def release(self, handle: TransferHandle) -> None: ...

    def share(self, stores_wire: list[dict]) -> None:
        """The target's KV stores (factory.rank_kv_wire), for a backend whose source maps them
        itself (`local`); the others move bytes through their transport and ignore them."""
        return None

    def disconnect(self, peer: str) -> None:
        with self._lock:
            if peer in self._peers:
                self._drop_peer(peer, "peer disconnected")

    def close(self) -> None:
        with self._lock:
            if self._ranks is None:
                return
            for peer in list(self._peers):
                self._drop_peer(peer, "backend closed")
            try:
                self._close()
            finally:
                self._ranks = None
                self._sources = []

    def _drop_peer(self, peer: str, reason: str) -> None:
        del self._peers[peer]
        self._close_peer(peer, reason)

    def _require_registered(self) -> list[RankKV]:
        if self._ranks is None:
            raise TransferError(f"{self.agent_name}: not registered (or closed)")
        return self._ranks

    def _require_peer(self, peer: str) -> list[RankKV]:
        self._require_registered()
        try:
            return self._peers[peer].ranks
        except KeyError:
            raise TransferError(f"{self.agent_name}: unknown or lost peer {peer!r}") from None

    def stats(self) -> dict[str, int]:
        """Counters for metrics (writes, failed transfers, rejected frames, ...)."""
        with self._lock:
            return dict(self._counters)

    def wait(self, handle: TransferHandle, deadline: float) -> TransferState:
        """Block until ``handle`` is DONE or FAILED; TransferTimeout at ``deadline``.

        Default: poll with a short, growing, capped sleep, for backends with nothing to block on.
        """
        return poll_until(self.poll, handle, deadline)

    def __enter__(self) -> TransferBackend:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
