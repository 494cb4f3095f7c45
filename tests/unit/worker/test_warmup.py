"""The start-up warm-up (worker/warmup.py), on CPU: it reaches every kind of step a serving
engine can run, and leaves nothing behind -- no request, block, block-table row or penalty
state, and the same tokens afterwards as an engine that never warmed up."""

from __future__ import annotations

import pytest

from engine.request import Request
from engine.sampling_params import SamplingParams
from tests.unit.engine.helpers import assert_nothing_leaked
from tests.unit.worker.conftest import make_prompts
from tests.unit.worker.test_overlap_engine import make_core, run
from worker.warmup import warm_up


def record_steps(core) -> list:
    seen: list = []
    execute = core.runner.preprocess_and_execute

    def recording(sched):
        seen.append(sched)
        return execute(sched)

    core.runner.preprocess_and_execute = recording
    return seen


def requests() -> list[Request]:
    prompts = make_prompts(6, seed=3, max_len=30)
    sampled = SamplingParams(temperature=0.9, top_p=0.9, seed=5, max_tokens=8)
    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    unseeded = SamplingParams(temperature=0.7, max_tokens=8)  # the engine's own generator
    params = [greedy, sampled, unseeded]
    return [Request(f"r{i}", p, params[i % 3]) for i, p in enumerate(prompts)]


@pytest.mark.parametrize("overlap", [False, True])
def test_warm_up_reaches_every_step_kind_and_leaves_nothing(checkpoints, overlap):
    core = make_core(checkpoints["llama"].path, overlap=overlap)
    real = core.scheduler, core.block_manager
    steps = record_steps(core)
    warm_up(core)
    chunks = [c for s in steps for c in s.chunks]
    assert any(c.num_tokens > 1 and c.start_pos > 0 for c in chunks), "no chunk after a prefix"
    # Steps that run eagerly on a GPU (a prefill chunk beside decode rows), with decode rows
    # that take one split (every row's keys <= 64) and with rows that take several.
    mixed = [s for s in steps if {c.num_tokens == 1 for c in s.chunks} == {True, False}]
    longest = [max(c.end_pos for c in s.chunks if c.num_tokens == 1) for s in mixed]
    assert any(n <= 64 for n in longest), "no eager step of one-split decode rows"
    assert any(n > 64 for n in longest), "no eager step with a multi-split decode row"
    assert (core.scheduler, core.block_manager) == real
    assert_nothing_leaked(core.scheduler)
    assert core.block_manager.num_free_blocks == core.block_manager.num_blocks
    assert core.runner.block_tables.num_rows_used == 0
    assert core.runner.sampler.penalty_counts.num_requests == 0
    assert not core.has_work()


def test_tokens_after_warm_up_equal_those_of_a_cold_engine(checkpoints):
    path = checkpoints["llama"].path
    cold = run(make_core(path, overlap=True), requests())
    warm_core = make_core(path, overlap=True)
    warm_up(warm_core)
    assert run(warm_core, requests()) == cold


def test_flash_lengths_run_as_fresh_prompts_and_leave_nothing(checkpoints):
    core = make_core(checkpoints["llama"].path, overlap=True, max_num_batched_tokens=64)
    steps = record_steps(core)
    warm_up(core, flash_lengths=[40, 56, 10**6])  # the last is past what the cache holds
    fresh = {c.num_tokens for s in steps for c in s.chunks if c.start_pos == 0}
    assert {40, 56} <= fresh and 10**6 not in fresh
    assert_nothing_leaked(core.scheduler)
    assert core.block_manager.num_free_blocks == core.block_manager.num_blocks
    assert core.runner.block_tables.num_rows_used == 0
