"""The default model (SmolLM2-135M-Instruct) through the engine vs transformers, 16 tokens (the
integration tests compare 24-token completions of 16 prompts with the offline engine)."""

from __future__ import annotations

import torch

from engine.config import ModelConfig
from engine.sampling_params import SamplingParams
from worker.llm import LLM

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Water boils at a temperature of",
]


def test_greedy_tokens_identical_to_transformers(default_model_path) -> None:
    from transformers import AutoModelForCausalLM

    llm = LLM(ModelConfig(path=str(default_model_path), device="cpu", dtype="float32"))
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    ours = [c.token_ids for c in llm.generate(prompts, params)]
    hf = AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # like ignore_eos: run the full 16 tokens
    for prompt, tokens in zip(prompts, ours, strict=True):
        with torch.inference_mode():
            out = hf.generate(
                torch.tensor([prompt]),
                max_new_tokens=16,
                do_sample=False,
                pad_token_id=0,
            )
        assert tokens == out[0, len(prompt) :].tolist()
