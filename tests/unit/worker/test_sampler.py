from __future__ import annotations

import torch

from engine.sampling_params import SamplingParams
from tests.unit.worker.conftest import Driver, make_prompts
from worker.model_runner import ModelRunner
from worker.sampler import Sampler, SamplingRow

CPU = torch.device("cpu")


def _rows(params: SamplingParams, n: int, num_generated: int = 0) -> list[SamplingRow]:
    return [SamplingRow(params, num_generated) for _ in range(n)]


def test_greedy_is_argmax_and_degenerate_filters_are_greedy() -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    sampler = Sampler(CPU, seed=1)
    argmax = logits.argmax(-1)
    assert torch.equal(sampler(logits, _rows(SamplingParams(temperature=0.0), 6)), argmax)
    assert torch.equal(sampler(logits, _rows(SamplingParams(top_k=1), 6)), argmax)
    assert torch.equal(sampler(logits, _rows(SamplingParams(top_p=1e-6), 6)), argmax)
    mixed = [SamplingRow(SamplingParams(temperature=t), 0) for t in (0.0, 1.0, 0.0, 1.0, 0.0, 1.0)]
    assert torch.equal(sampler(logits, mixed)[::2], argmax[::2])


def test_frequencies_follow_the_filtered_distribution() -> None:
    n = 20000
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]).repeat(n, 1)
    sampler = Sampler(CPU, seed=2)

    def frequencies(params: SamplingParams) -> torch.Tensor:
        counts = torch.bincount(sampler(logits, _rows(params, n)), minlength=5)
        return counts.float() / n

    expected = (logits[0] / 0.7).softmax(-1)
    torch.testing.assert_close(
        frequencies(SamplingParams(temperature=0.7)), expected, atol=0.015, rtol=0
    )
    top2 = logits[0, :2].softmax(-1)
    torch.testing.assert_close(frequencies(SamplingParams(top_k=2))[:2], top2, atol=0.015, rtol=0)
    assert frequencies(SamplingParams(top_k=2))[2:].sum() == 0
    # p(0) = 0.53, p(0) + p(1) = 0.73: top_p 0.6 keeps exactly the first two tokens.
    assert frequencies(SamplingParams(top_p=0.6))[2:].sum() == 0


def test_seeded_rows_ignore_batch_neighbours_and_runner_state() -> None:
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(3))
    seeded = SamplingParams(seed=42, temperature=1.0)
    alone = Sampler(CPU, seed=0)(logits[1:2], [SamplingRow(seeded, 5)])
    rows = [
        SamplingRow(SamplingParams(), 0),
        SamplingRow(seeded, 5),
        SamplingRow(SamplingParams(seed=7), 5),
    ]
    other = Sampler(CPU, seed=99)
    other(logits[:3], rows)  # advance the runner generator
    assert other(logits[:3], rows)[1] == alone[0]
    draws = {int(Sampler(CPU)(logits[1:2], [SamplingRow(seeded, g)])[0]) for g in range(20)}
    assert len(draws) > 5, "the step must change the draw"


def test_seeded_generation_is_reproducible_across_runs_and_batches(checkpoints) -> None:
    path = checkpoints["qwen2"].path

    def run(prompts, params, seed):
        runner = ModelRunner(path, dtype="float32", block_size=4, num_blocks=128, seed=seed)
        return Driver(runner).generate(prompts, 16, params=params)

    prompts = make_prompts(4, seed=21)
    seeded = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=1234)
    alone = run(prompts[:1], [seeded], seed=0)[0]
    assert run(prompts[:1], [seeded], seed=5)[0] == alone
    others = [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.0),
        SamplingParams(seed=9),
    ]
    batched = run(
        prompts[1:3] + prompts[:1] + prompts[3:], [*others[:2], seeded, *others[2:]], seed=7
    )
    assert batched[2] == alone
    unseeded = SamplingParams(temperature=1.0)
    assert run(prompts[:1], [unseeded], seed=1) != run(prompts[:1], [unseeded], seed=2)
