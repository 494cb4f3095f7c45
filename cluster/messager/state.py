"""The cache messager's bookkeeping, separate from its actor so it can be tested alone.

Per request (one cache task) it tracks, layer by layer, how many of the request's blocks have
been written to D. A layer-ready signal for a step writes, for every request in that step, the
blocks that are now complete in that layer: full blocks below the chunk's end, and on the last
chunk also the partly filled tail block. Signals for a request whose cache task has not arrived
yet are kept (bounded in time) and replayed when it does; KV is never sent for an unknown task.

Writes are queued as signals arrive and issued by `flush` (from `poll`, which the actor calls
at the end of every round, after applying all of the round's messages): all layers of one
request's run of blocks that became ready in a round go in one `write_layers` -- one transfer
for NIXL and the local backend. A request's blocks are the same in every layer, so the
descriptors of a chunk's blocks are planned once (`backend.plan`, numpy rows) and every layer's
write only offsets them (cache_transfer/write_plan.py): no per-layer descriptor building.

Failures stay with their request: a write that cannot start, a poll that raises or a deadline
that passes marks that task failed; it is reported (once its writes drained) like any other.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cache_transfer.backend import TransferBackend, TransferHandle, TransferState
from cache_transfer.staging import StagedWriter
from engine.protocol.cache import CacheTask, ChunkPlan
from engine.protocol.identity import InstanceId

log = logging.getLogger(__name__)

_KEEP_PLANS = 64


@dataclass
class TaskState:
    task: CacheTask
    sent_blocks: list[int]  # per layer, how many of the task's blocks were written
    created: float = field(default_factory=time.monotonic)
    handles: list[TransferHandle] = field(default_factory=list)
    first_token_id: int = -1  # -1 until PrefillDone
    prefill_done_wall: float = 0.0  # when the first token came (PrefillDone)
    all_issued_wall: float = 0.0  # when the last layer's writes were issued (0: not yet)
    writes_done_wall: float = 0.0  # when every write was seen DONE
    failure: str = ""  # why it failed; a finished task without one succeeded
    client_informed: bool = False
    nbytes: int = 0
    # (first block, end block) -> the backend's plan of writing them: the same in every layer
    write_plans: dict[tuple[int, int], Any] = field(default_factory=dict)
    # (first block, end block) -> layers whose write of them waits for this round's flush
    queued: dict[tuple[int, int], list[int]] = field(default_factory=dict)
    last_queued: bool = False  # the last layer of the last chunk is queued

    @property
    def request_id(self) -> str:
        return self.task.request_id


@dataclass
class _Deferred:
    since: float
    signals: list[tuple[int, int, bool]] = field(default_factory=list)  # (layer, end_pos, last)


class MessagerState:
    """Pure bookkeeping around a TransferBackend; one thread drives it."""

    def __init__(
        self,
        backend: TransferBackend | StagedWriter,
        num_layers: int,
        block_size: int,
        peer_of: Callable[[InstanceId], str],
        task_wait_s: float,
        drain_s: float = 30.0,
    ) -> None:
        self.backend = backend
        self.num_layers = num_layers
        self.block_size = block_size
        self.peer_of = peer_of  # the backend's peer name of a decode instance
        self.task_wait_s = task_wait_s
        self.drain_s = drain_s
        self.tasks: dict[str, TaskState] = {}
        self.plans: dict[int, list[ChunkPlan]] = {}
        self.deferred: dict[str, _Deferred] = {}
        self.missed: dict[str, float] = {}  # request id -> when its signals were given up
        self.counters = {"unknown_task_waits": 0, "missed_tasks": 0, "writes": 0, "bad_messages": 0}

    # ------------------------------------------------------------------ inputs
    def add_task(self, task: CacheTask) -> None:
        if task.request_id in self.tasks:
            raise ValueError(f"a second cache task for {task.request_id}")
        # Blocks D already holds (its prefix cache) are never written: start past them.
        state = TaskState(task, [task.skip_blocks] * self.num_layers)
        self.tasks[task.request_id] = state
        if len(task.dst_block_ids) < len(task.src_block_ids):
            state.failure = (
                f"{len(task.src_block_ids)} source blocks for {len(task.dst_block_ids)} on D"
            )
        elif self.missed.pop(task.request_id, None) is not None:
            state.failure = "cache task arrived after its layer signals were given up"
        deferred = self.deferred.pop(task.request_id, None)
        if deferred is not None:
            for layer, end_pos, last in deferred.signals:
                self._issue(state, layer, end_pos, last)

    def add_plan(self, step_id: int, chunks: list[ChunkPlan]) -> None:
        self.plans[step_id] = chunks
        # A step that failed mid-forward never sends its last layer: forget old plans.
        for old in [s for s in self.plans if s < step_id - _KEEP_PLANS]:
            del self.plans[old]

    def layer_ready(self, step_id: int, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} of a {self.num_layers}-layer model")
        for chunk in self.plans.get(step_id, []):
            state = self.tasks.get(chunk.request_id)
            if state is not None:
                self._issue(state, layer, chunk.end_pos, chunk.last)
            elif chunk.request_id not in self.missed:
                self._defer(chunk.request_id, layer, chunk.end_pos, chunk.last)
        if layer == self.num_layers - 1:
            self.plans.pop(step_id, None)

    def prefill_done(self, request_id: str, first_token_id: int, wall: float) -> None:
        state = self.tasks.get(request_id)
        if state is not None:
            state.first_token_id = first_token_id
            state.prefill_done_wall = wall

    def cancel(self, request_id: str, reason: str, client_informed: bool = False) -> bool:
        """Stop issuing writes; the task finishes (failed) once in-flight writes drained."""
        self.deferred.pop(request_id, None)
        state = self.tasks.get(request_id)
        if state is None:
            return False
        state.failure = state.failure or reason
        state.client_informed = state.client_informed or client_informed
        return True

    # ------------------------------------------------------------------ progress
    def poll(self) -> list[TaskState]:
        """Issue queued writes, return finished tasks (their handles released), and expire stale
        deferred signals."""
        self.flush()
        now = time.monotonic()
        self._expire_deferred(now)
        done = [state for state in self.tasks.values() if self._finished(state, now)]
        for state in done:
            self._release(state)
            del self.tasks[state.request_id]
        return done

    @property
    def busy(self) -> bool:
        """Whether something needs polling soon (writes queued or in flight, signals deferred)."""
        return bool(self.deferred) or any(
            s.queued or s.last_queued or s.handles for s in self.tasks.values()
        )

    def _finished(self, state: TaskState, now: float) -> bool:
        pending = False
        for handle in state.handles:
            status = self._poll(state, handle)
            if status is TransferState.FAILED:
                state.failure = state.failure or (handle.error or "write failed")
            pending = pending or status is TransferState.PENDING
        if not state.failure and time.time() > state.task.write_deadline:
            state.failure = "write deadline passed before the KV was complete"
        if pending:
            if state.failure and now - state.created > self.drain_s:
                state.failure += " (writes did not drain)"
                return True
            return False
        if not state.failure and state.all_issued_wall and state.first_token_id >= 0:
            state.writes_done_wall = time.time()
            return True
        return bool(state.failure)

    def _poll(self, state: TaskState, handle: TransferHandle) -> TransferState:
        if handle.state is not TransferState.PENDING:
            return handle.state
        try:
            return self.backend.poll(handle)
        except Exception as exc:  # unknown: counted as in flight until the drain deadline
            state.failure = state.failure or f"polling a write failed: {exc}"
            return TransferState.PENDING

    def _release(self, state: TaskState) -> None:
        for handle in state.handles:
            try:
                self.backend.release(handle)
            except Exception:  # the backend frees it at close(); the other handles go on
                log.exception("releasing a write of %s failed", state.request_id)

    def _issue(self, state: TaskState, layer: int, end_pos: int, last: bool) -> None:
        if state.failure:
            return
        if time.time() > state.task.write_deadline:
            state.failure = "write deadline passed (D's lease on its blocks may have expired)"
            return
        src = state.task.src_block_ids
        upto = len(src) if last else min(end_pos // self.block_size, len(src))
        start = state.sent_blocks[layer]
        if upto > start:
            state.queued.setdefault((start, upto), []).append(layer)
            state.sent_blocks[layer] = upto
        if last and layer == self.num_layers - 1:
            state.last_queued = True

    def flush(self) -> None:
        """Issue the writes this round's signals queued: per request and run of blocks, every
        queued layer in one `write_layers` (one transfer where the backend can)."""
        for state in self.tasks.values():
            queued, state.queued = state.queued, {}
            for (start, upto), layers in queued.items():
                if not state.failure:
                    self._write(state, start, upto, layers)
            if state.last_queued:
                state.last_queued = False
                if not state.failure:
                    state.all_issued_wall = time.time()

    def _write(self, state: TaskState, start: int, upto: int, layers: list[int]) -> None:
        src, dst = state.task.src_block_ids, state.task.dst_block_ids
        try:
            plan = state.write_plans.get((start, upto))
            if plan is None:
                peer = self.peer_of(state.task.decode_instance)
                plan = self.backend.plan(peer, src[start:upto], dst[start:upto])
                state.write_plans[(start, upto)] = plan
            handles = self.backend.write_layers(plan, layers)
        except Exception as exc:  # this request's write only; the step's others go on
            state.failure = f"write of layers {layers} failed: {exc}"
            return
        state.handles += handles
        state.nbytes += sum(handle.nbytes for handle in handles)
        self.counters["writes"] += len(handles)

    def _defer(self, request_id: str, layer: int, end_pos: int, last: bool) -> None:
        deferred = self.deferred.get(request_id)
        if deferred is None:
            deferred = self.deferred[request_id] = _Deferred(time.monotonic())
            self.counters["unknown_task_waits"] += 1
        deferred.signals.append((layer, end_pos, last))

    def _expire_deferred(self, now: float) -> None:
        for request_id, deferred in list(self.deferred.items()):
            if now - deferred.since > self.task_wait_s:
                del self.deferred[request_id]
                self.missed[request_id] = now
                self.counters["missed_tasks"] += 1
        for request_id, when in list(self.missed.items()):
            if now - when > 10 * self.task_wait_s:  # bounded memory for ids never seen again
                del self.missed[request_id]
