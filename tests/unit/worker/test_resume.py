"""A migrated request resumes where its earlier run stopped: prompt + the tokens generated so
far, `prior_output_tokens` of them, and the rest of max_tokens. Seeded sampling and penalties
then give exactly the undisturbed run's tokens (the real engine on a tiny random checkpoint)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import EngineConfig, ModelConfig
from engine.request import Request
from engine.sampling_params import SamplingParams
from tests.unit.worker.conftest import build_checkpoint, make_prompts
from worker.engine_core import EngineCore

MAX_TOKENS = 24


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("resume_ckpt") / "llama"
    build_checkpoint("llama", path)
    return path


def _tokens(folder: Path, prompt: list[int], params: SamplingParams) -> list[int]:
    engine = EngineConfig.model_validate(
        {"scheduler": {"block_size": 8}, "cache": {"num_blocks": 64}}
    )
    core = EngineCore(ModelConfig(path=str(folder), device="cpu", dtype="float32"), engine)
    core.add_request(Request("r", prompt, params))
    out: list[int] = []
    while core.has_work():
        for delta in core.step():
            out += delta.new_token_ids
    return out


@pytest.mark.parametrize(
    "options",
    [
        {"temperature": 0.0},
        {"temperature": 1.0, "seed": 1234},
        {
            "temperature": 0.8,
            "top_k": 20,
            "seed": -7,
            "frequency_penalty": 0.7,
            "presence_penalty": 0.5,
        },
    ],
    ids=["greedy", "seeded", "seeded+penalties"],
)
def test_a_resumed_run_continues_the_undisturbed_one(folder: Path, options: dict) -> None:
    prompt = make_prompts(1, seed=3, min_len=20, max_len=20)[0]
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, **options)
    whole = _tokens(folder, prompt, params)
    assert len(whole) == MAX_TOKENS
    for cut in (1, 9, 17):
        resumed = SamplingParams(
            max_tokens=MAX_TOKENS - cut, ignore_eos=True, prior_output_tokens=cut, **options
        )
        assert whole[:cut] + _tokens(folder, prompt + whole[:cut], resumed) == whole, cut
    if "seed" in options:  # without the prior count, the noise of position `cut` is position 0's
        plain = SamplingParams(max_tokens=MAX_TOKENS - 9, ignore_eos=True, **options)
        assert whole[:9] + _tokens(folder, prompt + whole[:9], plain) != whole
