"""Cache messager bookkeeping: what gets written when, with a recording in-memory backend."""

from __future__ import annotations

import time

from cache_transfer.backend import TransferError, TransferHandle, TransferState
from cache_transfer.factory import kv_agent_name
from cluster.messager.state import MessagerState
from engine.config import Role
from engine.protocol.cache import CacheTask, ChunkPlan
from engine.protocol.identity import InstanceId

D0 = InstanceId(Role.DECODE, 0)


class RecordingBackend:
    """Test double: records writes to its one connected peer (decode-0); completion is
    controlled by the test."""

    def __init__(self) -> None:
        self.writes: list[tuple[int, list[int], list[int]]] = []
        self.handles: list[TransferHandle] = []
        self.released: list[TransferHandle] = []
        self.fail_next = False
        self.plans = 0  # plan() calls: one per chunk of blocks, whatever the layer count
        self.batches: list[list[int]] = []

    def write(self, peer, src_layer, src_ids, dst_layer, dst_ids) -> TransferHandle:
        if peer != kv_agent_name(D0):
            raise TransferError(f"unknown or lost peer {peer!r}")
        assert src_layer == dst_layer
        self.writes.append((src_layer, list(src_ids), list(dst_ids)))
        handle = TransferHandle(peer=peer, nbytes=100 * len(src_ids), num_descs=1)
        if self.fail_next:
            handle.state = TransferState.FAILED
            handle.error = "injected"
        self.handles.append(handle)
        return handle

    def plan(self, peer, src_ids, dst_ids) -> tuple:
        if peer != kv_agent_name(D0):
            raise TransferError(f"unknown or lost peer {peer!r}")
        self.plans += 1
        return peer, list(src_ids), list(dst_ids)

    def write_layers(self, plan: tuple, layers: list[int]) -> list[TransferHandle]:
        """Records one write per layer; `batches` the layers of each call."""
        peer, src_ids, dst_ids = plan
        self.batches.append(list(layers))
        return [self.write(peer, layer, src_ids, layer, dst_ids) for layer in layers]

    def poll(self, handle: TransferHandle) -> TransferState:
        return handle.state

    def release(self, handle: TransferHandle) -> None:
        self.released.append(handle)

    def complete_all(self) -> None:
        for handle in self.handles:
            if handle.state is TransferState.PENDING:
                handle.state = TransferState.DONE


def make_state(backend: RecordingBackend, layers: int = 2, wait_s: float = 5.0) -> MessagerState:
    return MessagerState(backend, layers, 4, kv_agent_name, task_wait_s=wait_s)


def task(rid: str = "r", num_prompt: int = 10, deadline_s: float = 60.0) -> CacheTask:
    blocks = -(-num_prompt // 4)
    return CacheTask(
        rid,
        D0,
        "tcp://d0",
        list(range(blocks)),
        [10 + b for b in range(blocks)],
        num_prompt,
        time.time() + deadline_s,
    )


def test_layerwise_chunked_stream_sends_full_blocks_then_tail() -> None:
    backend = RecordingBackend()
    state = make_state(backend)
    state.add_task(task(num_prompt=10))  # blocks 0,1 full, block 2 is the tail
    state.add_plan(
        0, [ChunkPlan("r", 6, False)]
    )  # first chunk: positions 0..5 -> only block 0 is full
    state.layer_ready(0, 0)
    state.layer_ready(0, 1)
    assert backend.writes == [] and state.busy  # queued until the round's flush
    state.flush()
    assert backend.writes == [(0, [0], [10]), (1, [0], [10])]
    assert backend.batches == [[0, 1]]  # both layers of the round in one write_layers
    state.add_plan(1, [ChunkPlan("r", 10, True)])  # last chunk: block 1 and the tail block 2
    state.layer_ready(1, 0)
    state.flush()
    assert backend.writes[-1] == (0, [1, 2], [11, 12])
    state.layer_ready(1, 1)
    assert state.poll() == []  # flushes layer 1; writes pending, no first token yet
    assert backend.batches == [[0, 1], [0], [1]]
    backend.complete_all()
    assert state.poll() == []  # still no first token
    state.prefill_done("r", 42, time.time())
    (outcome,) = state.poll()
    assert not outcome.failure and outcome.first_token_id == 42
    assert outcome.nbytes == 100 * 6
    assert len(backend.released) == len(backend.handles) == 4
    assert backend.plans == 2  # one per chunk, reused by its second layer
    assert not state.tasks and not state.plans


def test_signals_before_task_wait_and_replay() -> None:
    backend = RecordingBackend()
    state = make_state(backend, layers=1)
    state.add_plan(0, [ChunkPlan("r", 8, True)])
    state.layer_ready(0, 0)
    assert backend.writes == []  # never send KV for an unknown task
    assert state.busy
    state.add_task(task(num_prompt=8))
    state.flush()
    assert backend.writes == [(0, [0, 1], [10, 11])]


def test_task_that_never_comes_is_given_up_and_fails_if_late() -> None:
    backend = RecordingBackend()
    state = make_state(backend, layers=1, wait_s=0.01)
    state.add_plan(0, [ChunkPlan("r", 8, True)])
    state.layer_ready(0, 0)
    time.sleep(0.02)
    assert state.poll() == [] and not state.deferred
    state.add_task(task(num_prompt=8))
    (outcome,) = state.poll()
    assert outcome.failure and "given up" in outcome.failure
    assert backend.writes == []


def test_cancel_waits_for_inflight_writes_then_fails() -> None:
    backend = RecordingBackend()
    state = make_state(backend, layers=1)
    state.add_task(task(num_prompt=8))
    state.add_plan(0, [ChunkPlan("r", 8, True)])
    state.layer_ready(0, 0)
    state.flush()
    assert state.cancel("r", "aborted")
    assert state.poll() == []  # the in-flight write must drain before D may free its blocks
    backend.complete_all()
    (outcome,) = state.poll()
    assert outcome.failure and outcome.failure == "aborted"
    assert not state.cancel("unknown", "x")


def test_failed_write_fails_the_task_and_stops_writing() -> None:
    backend = RecordingBackend()
    backend.fail_next = True
    state = make_state(backend, layers=2)
    state.add_task(task(num_prompt=8))
    state.add_plan(0, [ChunkPlan("r", 8, True)])
    state.layer_ready(0, 0)
    (outcome,) = state.poll()
    assert outcome.failure and outcome.failure == "injected"
    state.layer_ready(0, 1)
    assert len(backend.writes) == 1


def test_unknown_decode_instance_fails_without_writing() -> None:
    backend = RecordingBackend()
    state = make_state(backend, layers=1)
    bad = task()
    bad.decode_instance = InstanceId(Role.DECODE, 9)
    state.add_task(bad)
    state.add_plan(0, [ChunkPlan("r", 10, True)])
    state.layer_ready(0, 0)
    (outcome,) = state.poll()
    assert outcome.failure and "decode-9" in outcome.failure and backend.writes == []


def test_no_write_after_the_write_deadline() -> None:
    backend = RecordingBackend()
    state = make_state(backend, layers=2)
    state.add_task(task(num_prompt=8, deadline_s=-1.0))  # already past
    state.add_plan(0, [ChunkPlan("r", 8, True)])
    state.layer_ready(0, 0)
    (outcome,) = state.poll()
    assert outcome.failure and "deadline" in outcome.failure
    assert backend.writes == []


def test_task_past_deadline_fails_without_signals() -> None:
    backend = RecordingBackend()
    state = make_state(backend, layers=1)
    state.add_task(task(num_prompt=8, deadline_s=0.01))
    time.sleep(0.02)
    (outcome,) = state.poll()
    assert outcome.failure and "deadline" in outcome.failure


def test_a_queued_write_of_a_cancelled_task_is_never_issued() -> None:
    backend = RecordingBackend()
    state = make_state(backend, layers=2)
    state.add_task(task(num_prompt=8))
    state.add_plan(0, [ChunkPlan("r", 8, True)])
    state.layer_ready(0, 0)
    state.layer_ready(0, 1)
    assert state.cancel("r", "aborted")
    (outcome,) = state.poll()  # nothing was in flight: done at once
    assert outcome.failure == "aborted" and backend.writes == [] and not outcome.all_issued_wall
