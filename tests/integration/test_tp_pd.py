"""Prefill and decode at different tensor-parallel sizes on local Ray over real NIXL: a 1P1D
deployment with P at TP 2 / D at TP 1, and one with P at TP 1 / D at TP 2 (rank actors in each
instance's placement group, gloo between them, every rank's KV cache in shared memory). Each
serves 16 concurrent requests exactly as the offline engine does and frees every block; a dead
prefill rank restarts the prefill instance, which then serves the same again.

The default model has 3 KV heads, which TP 2 cannot split, so this module writes a tiny random
Llama (4 query / 2 KV heads) with a byte-level tokenizer for the HTTP path."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray

from benchmarks.model_folders import write_byte_tokenizer
from engine.config import EngineConfig, ModelConfig
from engine.sampling_params import SamplingParams
from tests.integration.harness import (
    assert_all_free,
    failures_in,
    prompts,
    run_load,
    small_config,
    start,
    wait_until,
)
from tests.unit.worker.conftest import save_llama

pytestmark = pytest.mark.timeout(600)
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tp_pd") / "llama"
    # 4 query / 2 KV heads; room for the byte tokenizer's 258 ids
    save_llama(folder, vocab_size=320, max_position_embeddings=1024, bos_token_id=0, eos_token_id=1)
    return write_byte_tokenizer(folder)


@pytest.fixture(scope="module")
def offline(model: Path) -> dict[str, str]:
    from worker.llm import LLM

    llm = LLM(ModelConfig(path=str(model), device="cpu", dtype="float32"), EngineConfig())
    completions = llm.generate(prompts(), SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    return {p: c.text for p, c in zip(prompts(), completions, strict=True)}


def _a_dead_prefill_rank_restarts_the_instance(dep, offline: dict[str, str]) -> None:
    """The rank's death ends P's process; Ray restarts it with new ranks and new KV stores,
    and the supervisor re-attaches the messager to all of them."""
    pid = dep.stats()["prefill-0"]["pid"]
    ray.kill(ray.get_actor("prefill-0-rank-1", namespace="pdserve"), no_restart=True)
    wait_until(lambda: "prefill-0" in dep.supervisor.recoveries, timeout_s=300)
    prompt_list = prompts()[:6]
    assert run_load(dep.url, prompt_list, MAX_TOKENS) == [offline[p] for p in prompt_list]
    assert dep.stats()["prefill-0"]["pid"] != pid
    assert_all_free(dep)


@pytest.mark.parametrize(("p_size", "d_size"), [(2, 1), (1, 2)])
def test_pd_at_different_sizes_serves_what_one_engine_serves(model, offline, p_size, d_size):
    per_rank = {"placement": {"num_cpus": 0.25}}
    config = small_config(
        model={"path": str(model)},
        transfer={"backend": "nixl"},
        prefill={"engine": {"tensor_parallel_size": p_size}, **per_rank},
        decode={"engine": {"tensor_parallel_size": d_size}, **per_rank},
    )
    dep = start(config)
    try:
        prompt_list = prompts()
        texts = run_load(dep.url, prompt_list, MAX_TOKENS)
        for prompt, text in zip(prompt_list, texts, strict=True):
            assert text == offline[prompt], prompt
        stats = assert_all_free(dep)
        assert not failures_in(stats)
        moved = stats["messager-0"]["transfer"]["writes"]
        assert moved > 0, stats["messager-0"]
        if p_size > 1:
            _a_dead_prefill_rank_restarts_the_instance(dep, offline)
    finally:
        dep.stop()
