"""Tensor parallelism on two GPUs (NCCL): Llama-3-8B shape with random bf16 weights.

- TP 2 logits match TP 1 within bf16 tolerance (prefill of a batch, then decode steps);
- TP 2 with CUDA graphs (all-reduces captured) gives the same tokens as TP 2 eager, each run in
  a process of its own (a process's second NCCL group could not be torn down: see
  TPRunner._leave_group).
Run: python -m pytest -m gpu tests/gpu/test_tp.py
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
import torch

from benchmarks.model_folders import SHAPES, write_model_folder
from engine.batch import ScheduledChunk, SchedulerOutput
from engine.sampling_params import SamplingParams
from tests.unit.worker.conftest import Driver
from worker.model_runner import ModelRunner
from worker.tp_runner import TPRunner
from worker.tp_worker import RunnerArgs, start_process_ranks

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs"),
]
NUM_BLOCKS = 512
BLOCK = 16


@pytest.fixture(scope="module")
def llama8b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model_folder(tmp_path_factory.mktemp("llama3-8b"), SHAPES["llama3-8b"])


def _args(path: Path, cuda_graphs: bool) -> RunnerArgs:
    return RunnerArgs(
        str(path),
        dtype="bfloat16",
        num_blocks=NUM_BLOCKS,
        load_format="random",
        cuda_graphs=cuda_graphs,
        graph_batch_sizes=[1, 2, 4, 8],
        max_model_len=2048,
    )


def _tp2(path: Path, cuda_graphs: bool) -> TPRunner:
    return TPRunner(
        _args(path, cuda_graphs),
        2,
        torch.device("cuda:0"),
        start_process_ranks,
        ["cuda:0", "cuda:1"],
        collective_timeout_s=300.0,
    )


def _schedule(prompts: list[list[int]]) -> list[SchedulerOutput]:
    """A prefill of every prompt, then three decode steps of fixed tokens (teacher forcing, so
    both runs see the same inputs whatever they sample)."""
    greedy = SamplingParams(temperature=0.0)
    blocks = [list(range(i * 16, i * 16 + 16)) for i in range(len(prompts))]
    steps = [
        SchedulerOutput(
            0,
            [ScheduledChunk(f"r{i}", p, 0, blocks[i], True, greedy) for i, p in enumerate(prompts)],
        )
    ]
    for s in range(3):
        chunks = [
            ScheduledChunk(f"r{i}", [1000 + 7 * i + s], len(p) + s, blocks[i], True, greedy, s + 1)
            for i, p in enumerate(prompts)
        ]
        steps.append(SchedulerOutput(s + 1, chunks))
    return steps


def _logits(runner, model, steps: list[SchedulerOutput]) -> list[torch.Tensor]:
    """The logits `model` (the runner's own, or rank 0's) computed at each step, in fp32."""
    seen: list[torch.Tensor] = []
    compute = model.compute_logits

    def recording(hidden: torch.Tensor) -> torch.Tensor:
        logits = compute(hidden)
        seen.append(logits.float().cpu())
        return logits

    model.compute_logits = recording
    try:
        for sched in steps:
            runner.execute_model(sched)
    finally:
        model.compute_logits = compute
    return seen


def test_tp2_logits_match_tp1_within_bf16_tolerance(llama8b: Path) -> None:
    prompts = [[(31 * i + 17 * j) % 128000 + 2 for j in range(40 + 37 * i)] for i in range(4)]
    steps = _schedule(prompts)
    single = ModelRunner(
        llama8b,
        dtype="bfloat16",
        device="cuda:0",
        num_blocks=NUM_BLOCKS,
        load_format="random",
        cuda_graphs=False,
    )
    expected = _logits(single, single.model, steps)
    del single
    torch.cuda.empty_cache()
    tp = _tp2(llama8b, cuda_graphs=False)
    try:
        got = _logits(tp, tp.local.model, steps)
    finally:
        tp.shutdown()
    for want, have in zip(expected, got, strict=True):
        assert have.shape == want.shape == (4, 128256)
        scale = want.abs().max().item()
        # bf16 with another summation order over 32 layers: close, not equal
        assert (have - want).abs().max().item() <= 0.1 * scale
        cosine = torch.nn.functional.cosine_similarity(have, want, dim=-1)
        assert cosine.min().item() > 0.995
        assert (have.argmax(-1) == want.argmax(-1)).float().mean().item() >= 0.75


def test_tp2_cuda_graphs_give_the_same_tokens_as_eager(llama8b: Path) -> None:
    prompts = [[(13 * i + 5 * j) % 128000 + 2 for j in range(20 + 9 * i)] for i in range(6)]
    eager, graphs = (_tokens_in_own_process(llama8b, g, prompts) for g in (False, True))
    assert eager == graphs


def _generate(path: str, cuda_graphs: bool, prompts: list[list[int]], out) -> None:
    tp = _tp2(Path(path), cuda_graphs=cuda_graphs)
    try:
        out.put(Driver(tp).generate(prompts, 24))
    finally:
        tp.shutdown()


def _tokens_in_own_process(path: Path, cuda_graphs: bool, prompts: list[list[int]]):
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    child = ctx.Process(target=_generate, args=(str(path), cuda_graphs, prompts, out))
    child.start()
    try:
        return out.get(timeout=400)
    finally:
        child.join(60)
        if child.is_alive():
            child.kill()
