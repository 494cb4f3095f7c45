"""Blocks the decode instance already holds are never written (decode-side prefix reuse)."""

from __future__ import annotations

import dataclasses
import time

from engine.protocol.cache import ChunkPlan
from tests.unit.messager.test_state import RecordingBackend, make_state, task


def test_only_the_blocks_d_lacks_are_written() -> None:
    backend = RecordingBackend()
    state = make_state(backend)
    state.add_task(dataclasses.replace(task(num_prompt=14), skip_blocks=2))  # blocks 0-1 held
    state.add_plan(0, [ChunkPlan("r", 6, False)])  # block 0 complete: D has it
    state.layer_ready(0, 0)
    state.layer_ready(0, 1)
    state.flush()
    assert backend.writes == []
    state.add_plan(1, [ChunkPlan("r", 14, True)])  # blocks 1 (held), 2 and the tail 3
    state.layer_ready(1, 0)
    state.layer_ready(1, 1)
    state.flush()
    assert backend.writes == [(0, [2, 3], [12, 13]), (1, [2, 3], [12, 13])]
    backend.complete_all()
    state.prefill_done("r", 7, time.time())
    (outcome,) = state.poll()
    assert not outcome.failure and outcome.nbytes == 100 * 4


def test_a_prompt_d_holds_whole_completes_without_writes() -> None:
    backend = RecordingBackend()
    state = make_state(backend, layers=1)
    state.add_task(dataclasses.replace(task(num_prompt=8), skip_blocks=2))
    state.add_plan(0, [ChunkPlan("r", 8, True)])
    state.layer_ready(0, 0)
    state.prefill_done("r", 7, time.time())
    (outcome,) = state.poll()
    assert not outcome.failure and backend.writes == [] and outcome.nbytes == 0
