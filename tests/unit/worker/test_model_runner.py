"""Greedy tokens identical to transformers' `generate`, however the requests are batched."""

from __future__ import annotations

import pytest
import torch

from engine.batch import ScheduledChunk, SchedulerOutput
from engine.sampling_params import SamplingParams
from tests.unit.worker.conftest import CHECKPOINTS, Driver, make_prompts
from worker.model_runner import ModelRunner

NEW_TOKENS = 20


def _runner(checkpoints, name: str, **kwargs) -> ModelRunner:
    kwargs = {"dtype": "float32", "block_size": 4, "num_blocks": 128, **kwargs}
    return ModelRunner(checkpoints[name].path, **kwargs)


def _expected(checkpoints, name: str, prompts: list[list[int]]) -> list[list[int]]:
    return [checkpoints[name].hf_greedy(p, NEW_TOKENS) for p in prompts]


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_one_request_at_a_time(checkpoints, name: str) -> None:
    driver = Driver(_runner(checkpoints, name))
    prompts = make_prompts(3, seed=11)
    got = [driver.generate([p], NEW_TOKENS)[0] for p in prompts]
    assert got == _expected(checkpoints, name, prompts)


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_batch_of_mixed_lengths(checkpoints, name: str) -> None:
    prompts = make_prompts(5, seed=12, min_len=1, max_len=45)
    got = Driver(_runner(checkpoints, name)).generate(prompts, NEW_TOKENS)
    assert got == _expected(checkpoints, name, prompts)


@pytest.mark.parametrize("name", ["llama3_rope", "mistral", "qwen3"])
@pytest.mark.parametrize("decode_first", [True, False])
def test_chunked_prefill_with_staggered_arrivals(checkpoints, name: str, decode_first) -> None:
    prompts = make_prompts(4, seed=13, min_len=5, max_len=40)
    driver = Driver(_runner(checkpoints, name, block_size=8), chunk_size=7, seed=3)
    got = driver.generate(
        prompts, NEW_TOKENS, arrival_steps=[0, 1, 4, 9], decode_first=decode_first
    )
    assert got == _expected(checkpoints, name, prompts)


def test_kv_budget_premade_tensors_and_layer_callback(checkpoints) -> None:
    runner = _runner(checkpoints, "llama3_rope", num_blocks=None, kv_cache_bytes=1 << 20)
    assert runner.num_blocks == (1 << 20) // (3 * 2 * 4 * 2 * 16 * 4)

    tensors = [torch.zeros(32, 2, 4, 2, 16) for _ in range(3)]
    done: list[int] = []

    def layer_done(i: int) -> None:
        # Layer i's KV is in the cache already; later layers' is not yet.
        assert tensors[i][10].abs().sum() > 0
        assert all(t[10].abs().sum() == 0 for t in tensors[i + 1 :])
        done.append(i)

    runner = _runner(
        checkpoints, "llama3_rope", num_blocks=None, kv_tensors=tensors, layer_done=layer_done
    )
    assert runner.kv_cache.layers[0] is tensors[0]
    prompt = make_prompts(1, seed=14)[0]
    blocks = list(range(10, 10 + len(prompt) // 4 + 1))
    chunk = ScheduledChunk("a", prompt, 0, blocks, True, SamplingParams(temperature=0.0))
    runner.execute_model(SchedulerOutput(0, [chunk]))
    assert done == [0, 1, 2]
    assert all(t[10].abs().sum() > 0 and t[0].abs().sum() == 0 for t in tensors)


def test_three_phases_and_chunks_that_do_not_sample(checkpoints) -> None:
    runner = _runner(checkpoints, "llama")
    greedy = SamplingParams(temperature=0.0)
    a, b = make_prompts(2, seed=15, min_len=10, max_len=10)
    first = SchedulerOutput(0, [ScheduledChunk("a", a[:6], 0, [0, 1], False, greedy)])
    second = SchedulerOutput(
        1,
        [
            ScheduledChunk("a", a[6:], 6, [0, 1, 2], True, greedy),
            ScheduledChunk("b", b, 0, [5, 6, 7], True, greedy),
        ],
    )
    assert runner.execute_model(SchedulerOutput(9, [])).sampled_token_ids == []
    # Overlap order: step 1 executes before step 0's output is saved.
    state0 = runner.preprocess_and_execute(first)
    runner.postprocess(state0)
    state1 = runner.preprocess_and_execute(second)
    out0 = runner.save_output(state0)
    runner.postprocess(state1)
    out1 = runner.save_output(state1)
    assert (out0.step_id, out0.request_ids, out0.sampled_token_ids) == (0, ["a"], [None])
    assert out1.request_ids == ["a", "b"]
    assert out1.sampled_token_ids == [
        checkpoints["llama"].hf_greedy(a, 1)[0],
        checkpoints["llama"].hf_greedy(b, 1)[0],
    ]
