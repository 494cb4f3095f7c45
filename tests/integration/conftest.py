from __future__ import annotations

import pytest

from engine.config import EngineConfig, ModelConfig
from engine.sampling_params import SamplingParams
from tests.integration.harness import prompts

MAX_TOKENS = 24


@pytest.fixture(scope="session")
def reference_outputs(default_model_path) -> dict[str, str]:
    """Greedy completions of the test prompts from the single-instance engine."""
    from worker.llm import LLM

    llm = LLM(
        ModelConfig(path=str(default_model_path), device="cpu", dtype="float32"), EngineConfig()
    )
    prompt_list = prompts()
    completions = llm.generate(prompt_list, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    del llm
    return {p: c.text for p, c in zip(prompt_list, completions, strict=True)}
