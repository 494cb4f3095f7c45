"""The real scheduler + model runner (EngineCore) against transformers, token for token."""

from __future__ import annotations

import pytest

from engine.config import EngineConfig, ModelConfig
from engine.request import Request
from engine.sampling_params import SamplingParams
from tests.unit.engine.helpers import assert_nothing_leaked
from tests.unit.worker.conftest import make_prompts
from worker.engine_core import EngineCore

MAX_NEW = 16


def run_engine(core: EngineCore, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    requests = [Request(f"r{i}", p, params) for i, p in enumerate(prompts)]
    for request in requests:
        core.add_request(request)
    while core.has_work():
        core.step()
        core.scheduler.check_invariants()
    return [r.output_token_ids for r in requests]


@pytest.mark.parametrize("name", ["llama", "llama3_rope", "qwen2", "qwen3"])
@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "whole"])
@pytest.mark.parametrize("prefix", [True, False], ids=["prefix", "noprefix"])
def test_batch_of_mixed_lengths_matches_transformers(checkpoints, name, chunked, prefix) -> None:
    ckpt = checkpoints[name]
    shared = make_prompts(1, seed=7, min_len=35, max_len=35)[0]
    prompts = make_prompts(4, seed=3) + [shared + p for p in make_prompts(3, seed=5, max_len=9)]
    engine = EngineConfig.model_validate(
        {
            "scheduler": {
                "max_num_batched_tokens": 24,  # long prompts span several chunks
                "enable_chunked_prefill": chunked,
                "enable_prefix_caching": prefix,
                "block_size": 8,
            },
            "cache": {"num_blocks": 64},
        }
    )
    core = EngineCore(ModelConfig(path=str(ckpt.path), device="cpu", dtype="float32"), engine)
    first = run_engine(core, prompts[:5])  # the shared prefix is cached by now
    second = run_engine(core, prompts[5:])
    for prompt, tokens in zip(prompts, first + second, strict=True):
        assert tokens == ckpt.hf_greedy(prompt, MAX_NEW)
    if prefix:
        assert core.block_manager.prefix_hits > 0
    assert_nothing_leaked(core.scheduler)
