"""Presence/frequency penalties and logprobs: the sampler on hand-made logits, then the real
engine (scheduler + runner) on a tiny random checkpoint against transformers' logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from engine.config import EngineConfig, ModelConfig
from engine.outputs import TokenDelta
from engine.request import Request
from engine.sampling_params import SamplingParams
from tests.unit.worker.conftest import build_checkpoint, make_prompts
from worker.engine_core import EngineCore
from worker.sampler import Sampler, SamplingRow

CPU = torch.device("cpu")


def _greedy(**penalties: float) -> SamplingParams:
    return SamplingParams(temperature=0.0, **penalties)


def test_penalties_shift_the_argmax_by_count_and_presence() -> None:
    logits = torch.tensor([[2.0, 1.9, 0.0, -1.0]])
    sampler = Sampler(CPU)

    def pick(params: SamplingParams, output: list[int]) -> int:
        return int(sampler(logits, [SamplingRow(params, len(output), output)])[0])

    assert pick(_greedy(), [0, 0]) == 0
    # frequency: 0.06 per occurrence; one occurrence leaves token 0 ahead, two do not.
    assert pick(_greedy(frequency_penalty=0.06), [0]) == 0
    assert pick(_greedy(frequency_penalty=0.06), [0, 0]) == 1
    # presence: once, however often the token occurred.
    assert pick(_greedy(presence_penalty=0.11), [0, 0, 0]) == 1
    assert pick(_greedy(presence_penalty=0.09), [0, 0, 0]) == 0
    # Negative values encourage repetition; placeholders (-1) count for nothing.
    assert pick(_greedy(presence_penalty=-0.2), [1]) == 1
    assert pick(_greedy(presence_penalty=2.0), [-1, -1]) == 0


def test_sampled_frequencies_follow_the_penalized_distribution() -> None:
    n = 20000
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5]])
    output = [0, 0, 1]
    params = SamplingParams(frequency_penalty=0.4, presence_penalty=0.3)
    rows = [SamplingRow(params, 3, output) for _ in range(n)]
    counts = torch.bincount(Sampler(CPU, seed=5)(logits.repeat(n, 1), rows), minlength=4)
    occurrences = torch.tensor([2.0, 1.0, 0.0, 0.0])
    penalized = logits[0] - 0.4 * occurrences - 0.3 * (occurrences > 0).float()
    torch.testing.assert_close(counts.float() / n, penalized.softmax(-1), atol=0.015, rtol=0)


def test_penalties_touch_only_their_rows_and_not_the_input() -> None:
    logits = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    seeded = SamplingParams(seed=3)
    alone = Sampler(CPU)(logits[1:2], [SamplingRow(seeded, 2)])
    rows = [
        SamplingRow(_greedy(presence_penalty=2.0), 2, [int(logits[0].argmax())]),
        SamplingRow(seeded, 2),
        SamplingRow(SamplingParams(seed=4, frequency_penalty=-1.0), 2, [5, 6]),
    ]
    sampled = Sampler(CPU)(logits, rows)
    assert sampled[1] == alone[0]
    assert sampled[0] != logits[0].argmax()
    assert torch.equal(logits, before)


def test_logprobs_are_log_softmax_of_the_raw_logits_with_sorted_top_k() -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    rows = [
        SamplingRow(SamplingParams(temperature=0.7, seed=1, logprobs=3), 0),
        SamplingRow(SamplingParams(), 0),  # did not ask
        SamplingRow(_greedy(logprobs=0, presence_penalty=1.5), 1, [7]),
        SamplingRow(SamplingParams(top_k=2, seed=2, logprobs=5), 0),
    ]
    sampler = Sampler(CPU)
    sampled = sampler(logits, rows)
    result = sampler.logprobs(logits, sampled, rows)
    assert result is not None and result.rows == [0, 2, 3] and result.num_top == [3, 0, 5]
    # Chunks 0..4, chunk 1 did not sample: sampled rows sit in chunks 0, 2, 3, 4.
    per_chunk = result.per_chunk([0, 2, 3, 4], num_chunks=5)
    assert per_chunk[1] is None and per_chunk[2] is None
    expected = torch.log_softmax(logits, dim=-1)  # raw: no temperature, penalty or filter
    for row, chunk in ((0, 0), (2, 3), (3, 4)):
        logprob, top = per_chunk[chunk]
        assert logprob == pytest.approx(float(expected[row, sampled[row]]), abs=1e-6)
        want = expected[row].topk(rows[row].params.logprobs or 0)
        assert [t for t, _ in top] == want.indices.tolist()
        assert [lp for _, lp in top] == pytest.approx(want.values.tolist(), abs=1e-6)
        assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)


def test_no_logprobs_asked_means_no_work() -> None:
    logits = torch.randn(2, 10)
    rows = [SamplingRow(SamplingParams(), 0), SamplingRow(_greedy(), 0)]
    sampler = Sampler(CPU)
    assert sampler.logprobs(logits, sampler(logits, rows), rows) is None


# ---------------------------------------------------------------------------- the real engine


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, transformers.PreTrainedModel]:
    folder = tmp_path_factory.mktemp("penalty_ckpt") / "llama"
    return folder, build_checkpoint("llama", folder)


def _run(
    folder: Path, prompt: list[int], params: SamplingParams, overlap: bool = False
) -> list[TokenDelta]:
    engine = EngineConfig.model_validate(
        {"scheduler": {"block_size": 8}, "cache": {"num_blocks": 32}}
    )
    model = ModelConfig(path=str(folder), device="cpu", dtype="float32")
    core = EngineCore(model, engine, overlap=overlap)
    core.add_request(Request("r", prompt, params))
    deltas: list[TokenDelta] = []
    while core.has_work():
        deltas += core.step()
    return deltas


def _hf_logprobs(model: transformers.PreTrainedModel, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0, -1].float()  # [V]
    return torch.log_softmax(logits, dim=-1)


def _hf_penalized_greedy(model, prompt: list[int], steps: int, freq: float, pres: float):
    tokens = list(prompt)
    for _ in range(steps):
        with torch.no_grad():
            logits = model(torch.tensor([tokens])).logits[0, -1].float()  # [V]
        counts = torch.bincount(
            torch.tensor(tokens[len(prompt) :], dtype=torch.int64), minlength=logits.shape[0]
        ).float()
        tokens.append(int((logits - freq * counts - pres * (counts > 0).float()).argmax()))
    return tokens[len(prompt) :]


def test_engine_logprobs_match_transformers(llama) -> None:
    folder, model = llama
    prompt = make_prompts(1, seed=11, min_len=12, max_len=12)[0]
    params = SamplingParams(temperature=0.8, seed=9, max_tokens=3, logprobs=5, ignore_eos=True)
    deltas = _run(folder, prompt, params)
    first = deltas[0]
    (logprob, top), token = first.logprobs[0], first.new_token_ids[0]
    expected = _hf_logprobs(model, prompt)
    assert logprob == pytest.approx(float(expected[token]), abs=1e-4)
    want = expected.topk(5)
    assert [t for t, _ in top] == want.indices.tolist()
    assert [lp for _, lp in top] == pytest.approx(want.values.tolist(), abs=1e-4)
    assert all(len(d.logprobs or []) == len(d.new_token_ids) for d in deltas)
    output = [t for d in deltas for t in d.new_token_ids]
    second = _hf_logprobs(model, prompt + output[:1])
    assert deltas[1].logprobs[0][0] == pytest.approx(float(second[output[1]]), abs=1e-4)


@pytest.mark.parametrize("overlap", [False, True], ids=["sequential", "overlap"])
@pytest.mark.parametrize(("freq", "pres"), [(2.0, 0.0), (0.0, -2.0), (1.0, 1.0)])
def test_engine_penalties_match_transformers(
    llama, freq: float, pres: float, overlap: bool
) -> None:
    """Under the overlap schedule the newest token is still on the device when the next one is
    sampled: it must be penalized all the same."""
    folder, model = llama
    steps = 12
    prompts = make_prompts(3, seed=4, min_len=6, max_len=10)
    changed = False
    for prompt in prompts:
        params = _greedy(frequency_penalty=freq, presence_penalty=pres)
        params.max_tokens, params.ignore_eos, params.logprobs = steps, True, 2
        deltas = _run(folder, prompt, params, overlap)
        output = [t for d in deltas for t in d.new_token_ids]
        assert output == _hf_penalized_greedy(model, prompt, steps, freq, pres)
        changed |= output != _hf_penalized_greedy(model, prompt, steps, 0.0, 0.0)
        # Logprobs stay those of the raw logits: the penalty is not in them.
        raw = _hf_logprobs(model, prompt + output[:2])
        assert deltas[2].logprobs[0][0] == pytest.approx(float(raw[output[2]]), abs=1e-4)
    assert changed, "the penalty never changed a token: the test would prove nothing"
