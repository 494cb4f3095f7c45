"""Tensor parallelism end to end on CPU: two rank processes joined by gloo give the same tokens
as one process (fp32), through the worker-level API (prefill, chunked prefill and decode steps
over paged KV), and a rank that dies fails the instance with a clear error instead of a hang."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from engine.batch import ScheduledChunk, SchedulerOutput
from engine.config import EngineConfig, ModelConfig
from engine.request import Request
from engine.sampling_params import SamplingParams
from tests.unit.worker.conftest import VOCAB, Driver, make_prompts
from tests.unit.worker.test_overlap_engine import run
from worker.engine_core import EngineCore
from worker.model_runner import ModelRunner
from worker.tp_runner import TensorParallelError, TPRunner
from worker.tp_worker import RunnerArgs, start_process_ranks

NUM_BLOCKS = 96
# Generous: six engineers share two cores; a failure must come well before any test timeout.
TIMEOUT_S = 120.0


def _tp_runner(path, size: int = 2, timeout_s: float = TIMEOUT_S) -> TPRunner:
    return TPRunner(
        RunnerArgs(str(path), dtype="float32", num_blocks=NUM_BLOCKS),
        size,
        torch.device("cpu"),
        start_process_ranks,
        ["cpu"] * size,
        collective_timeout_s=timeout_s,
        cpu_threads=1,
    )


def _generate(runner, prompts, params=None, chunk_size=None) -> list[list[int]]:
    return Driver(runner, chunk_size=chunk_size, seed=3).generate(prompts, 8, params)


@pytest.mark.parametrize("name", ["llama", "qwen3", "qwen2", "llama_tied", "llama3_rope"])
def test_tp2_gives_the_same_greedy_tokens_as_tp1(checkpoints, name):
    """llama: plain; qwen3: q/k norms; qwen2: qkv bias and 1 KV head (replicated on both ranks);
    llama_tied: tied embeddings, 1 KV head; llama3_rope: llama3 RoPE scaling, 3 layers."""
    path = checkpoints[name].path
    prompts = make_prompts(6, seed=11)
    single = ModelRunner(path, dtype="float32", num_blocks=NUM_BLOCKS)
    expected = _generate(single, prompts)
    expected_chunked = _generate(single, prompts, chunk_size=7)
    assert expected == [checkpoints[name].hf_greedy(p, 8) for p in prompts]
    tp = _tp_runner(path)
    try:
        assert tp.kv_cache.spec.num_kv_heads == max(1, single.config.num_kv_heads // 2)
        assert _generate(tp, prompts) == expected
        assert _generate(tp, prompts, chunk_size=7) == expected_chunked
    finally:
        tp.shutdown()


def test_tp2_seeded_sampling_and_logprobs_match_tp1(checkpoints):
    path = checkpoints["qwen3"].path
    prompts = make_prompts(5, seed=2)
    params = [SamplingParams(temperature=0.9, top_p=0.95, seed=100 + i) for i in range(5)]
    single = ModelRunner(path, dtype="float32", num_blocks=NUM_BLOCKS)
    expected = _generate(single, prompts, params)
    tp = _tp_runner(path)
    try:
        assert _generate(tp, prompts, params) == expected
        chunk = ScheduledChunk("lp", prompts[0], 0, [0, 1, 2], True, SamplingParams(logprobs=3))
        sched = SchedulerOutput(1000, [chunk])
        got, want = tp.execute_model(sched).logprobs[0], single.execute_model(sched).logprobs[0]
        (got_logprob, got_top), (want_logprob, want_top) = got, want  # [lp, [[id, lp], ...]]
        assert [t for t, _ in got_top] == [t for t, _ in want_top]
        assert got_logprob == pytest.approx(want_logprob, abs=1e-4)
        assert [lp for _, lp in got_top] == pytest.approx([lp for _, lp in want_top], abs=1e-4)
    finally:
        tp.shutdown()


def test_odd_vocabulary_shards_with_padding(tmp_path):
    """Vocabulary 255 over 2 ranks: the second shard ends in a padding row no token reaches."""
    from tests.unit.worker.conftest import save_llama

    save_llama(tmp_path, vocab_size=VOCAB - 1)
    prompts = [[t % (VOCAB - 1) for t in p] + [VOCAB - 2] for p in make_prompts(4, seed=5)]
    expected = _generate(ModelRunner(tmp_path, dtype="float32", num_blocks=NUM_BLOCKS), prompts)
    tp = _tp_runner(tmp_path)
    try:
        assert _generate(tp, prompts) == expected
    finally:
        tp.shutdown()


def test_a_rank_that_dies_fails_the_instance_not_hangs(checkpoints):
    tp = _tp_runner(checkpoints["llama"].path, timeout_s=60.0)
    try:
        assert _generate(tp, make_prompts(2, seed=1))  # healthy first
        (rank,) = tp.ranks
        os.kill(rank.process.pid, signal.SIGKILL)
        rank.process.join(TIMEOUT_S)
        deadline = time.monotonic() + TIMEOUT_S
        with pytest.raises(TensorParallelError, match=r"rank 1 .*exited with code -9"):
            while time.monotonic() < deadline:  # the watchdog notices within a poll interval
                _generate(tp, make_prompts(2, seed=1))
        assert tp.failure is not None
    finally:
        tp.shutdown(timeout_s=5.0)


def test_ranks_share_their_kv_caches_with_another_process(checkpoints):
    """A prefill instance's messager maps every rank's cache: rank 1 keeps its KV heads in a
    store it made, and its handle maps, in this process, the KV a TP 1 runner computes for
    those heads."""
    from cache_transfer.factory import attach_shared_kv, make_shared_kv

    path = checkpoints["llama"].path
    prompt = make_prompts(1, seed=4, min_len=20)[0]
    chunk = ScheduledChunk("kv", prompt, 0, [3, 4, 5], True, SamplingParams(temperature=0.0))
    single = ModelRunner(path, dtype="float32", num_blocks=NUM_BLOCKS)
    single.execute_model(SchedulerOutput(0, [chunk]))
    tp = TPRunner(
        RunnerArgs(str(path), dtype="float32", num_blocks=NUM_BLOCKS),
        2,
        torch.device("cpu"),
        start_process_ranks,
        ["cpu", "cpu"],
        collective_timeout_s=TIMEOUT_S,
        cpu_threads=1,
        kv_store=make_shared_kv,
        kv_store_prefix=f"pdserve-test-tp-{os.getpid()}",
    )
    try:
        tp.execute_model(SchedulerOutput(0, [chunk]))
        assert tp.rank_kv_handles[0] is None
        mapped = attach_shared_kv(tp.rank_kv_handles[1])
        try:
            rank1 = mapped.layer_tensors()
            assert rank1[0].shape[3] == 1  # 2 KV heads over 2 ranks
            for layer, whole in enumerate(single.kv_cache.layers):
                want = whole[[3, 4, 5]][..., 1:2, :]  # KV head 1
                torch.testing.assert_close(rank1[layer][[3, 4, 5]], want, rtol=1e-4, atol=1e-4)
        finally:
            mapped.close()
    finally:
        tp.shutdown()


def test_engine_core_at_tp2_with_the_overlap_schedule_matches_tp1(checkpoints):
    """EngineCore at tensor_parallel_size 2 (local rank processes) under the overlap schedule:
    every rank fills placeholders from its own sampled ids; tokens equal the TP 1 engine's, with
    greedy and seeded requests and chunked prefill."""

    def core(tp: int, overlap: bool):
        engine = EngineConfig.model_validate(
            {
                "scheduler": {"max_num_batched_tokens": 32, "block_size": 4},
                "cache": {"num_blocks": NUM_BLOCKS},
                "tensor_parallel_size": tp,
                "tensor_parallel_timeout_s": TIMEOUT_S,
            }
        )
        model = ModelConfig(path=str(checkpoints["qwen3"].path), device="cpu", dtype="float32")
        return EngineCore(model, engine, overlap=overlap)

    def requests():
        prompts = make_prompts(6, seed=9)
        params = [
            SamplingParams(temperature=0.0 if i % 2 else 0.8, seed=i, max_tokens=6 + i)
            for i in range(6)
        ]
        return [
            Request(f"q{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params, strict=True))
        ]

    expected = run(core(1, overlap=False), requests())
    tp = core(2, overlap=True)
    try:
        assert run(tp, requests()) == expected
    finally:
        tp.runner.shutdown()
