"""Tiny random checkpoints of every supported architecture, and a test-only generation driver.

Checkpoints are written once per session with transformers' own `save_pretrained`, so the loader
reads exactly what a user's folder holds. Weights are re-drawn with a wide spread (biases and
norm weights too) so that a wrongly mapped tensor changes the tokens, and so that greedy argmaxes
are not near-ties that fp32 rounding could flip.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import transformers

from engine.batch import ScheduledChunk, SchedulerOutput
from engine.sampling_params import SamplingParams
from worker.model_runner import ModelRunner

VOCAB = 256
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    eos_token_id=2,
)

CHECKPOINTS: dict[str, tuple[type, dict]] = {
    "llama": (transformers.LlamaConfig, dict(rope_theta=10000.0)),
    "llama3_rope": (
        transformers.LlamaConfig,
        dict(
            num_hidden_layers=3,
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
            eos_token_id=[2, 3],
        ),
    ),
    "llama_tied": (
        transformers.LlamaConfig,
        dict(tie_word_embeddings=True, num_key_value_heads=1, num_attention_heads=4),
    ),
    "mistral": (transformers.MistralConfig, dict(sliding_window=12, head_dim=16)),
    "qwen2": (transformers.Qwen2Config, dict(num_key_value_heads=1)),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=32, num_key_value_heads=2)),
}


def randomize(model: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5 * 1.5)


def save_llama(folder: Path, **overrides) -> transformers.PreTrainedModel:
    """A random Llama of the common tiny shape with `overrides`, saved to `folder`."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**_COMMON, **overrides})
    model = transformers.LlamaForCausalLM(config).eval()
    randomize(model)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def build_checkpoint(name: str, folder: Path) -> transformers.PreTrainedModel:
    config_cls, overrides = CHECKPOINTS[name]
    config = config_cls(**{**_COMMON, **overrides})
    torch.manual_seed(0)
    model_cls = {
        transformers.LlamaConfig: transformers.LlamaForCausalLM,
        transformers.MistralConfig: transformers.MistralForCausalLM,
        transformers.Qwen2Config: transformers.Qwen2ForCausalLM,
        transformers.Qwen3Config: transformers.Qwen3ForCausalLM,
    }[config_cls]
    model = model_cls(config).eval()
    randomize(model)
    model.save_pretrained(folder, safe_serialization=True)
    model.generation_config.eos_token_id = None  # references run the full length
    model.generation_config.pad_token_id = 0
    return model


@dataclass
class Checkpoint:
    name: str
    path: Path
    hf_model: transformers.PreTrainedModel
    _greedy_cache: dict = field(default_factory=dict)

    def hf_greedy(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        """transformers' own greedy continuation of one prompt (no padding), memoized."""
        key = (tuple(prompt), max_new_tokens)
        if key not in self._greedy_cache:
            with torch.no_grad():
                out = self.hf_model.generate(
                    torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False
                )
            self._greedy_cache[key] = out[0, len(prompt) :].tolist()
        return self._greedy_cache[key]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Checkpoint]:
    root = tmp_path_factory.mktemp("worker_ckpts")
    return {
        name: Checkpoint(name, root / name, build_checkpoint(name, root / name))
        for name in CHECKPOINTS
    }


def make_prompts(count: int, seed: int = 0, min_len: int = 3, max_len: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [
        [rng.randrange(4, VOCAB) for _ in range(rng.randint(min_len, max_len))]
        for _ in range(count)
    ]


@dataclass
class _Seq:
    request_id: str
    tokens: list[int]
    prompt_len: int
    max_new_tokens: int
    params: SamplingParams
    arrival_step: int
    computed: int = 0
    blocks: list[int] = field(default_factory=list)

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def done(self) -> bool:
        return self.num_generated >= self.max_new_tokens


class Driver:
    """Test-only scheduler: blocks from a shuffled free list, optional chunked prefill."""

    def __init__(self, runner: ModelRunner, chunk_size: int | None = None, seed: int = 0) -> None:
        self.runner = runner
        self.chunk_size = chunk_size
        self.free_blocks = list(range(runner.num_blocks))
        random.Random(seed).shuffle(self.free_blocks)
        self.step_id = 0

    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        params: list[SamplingParams] | None = None,
        arrival_steps: list[int] | None = None,
        decode_first: bool = True,
    ) -> list[list[int]]:
        seqs = [
            _Seq(
                request_id=f"r{i}",
                tokens=list(p),
                prompt_len=len(p),
                max_new_tokens=max_new_tokens,
                params=params[i] if params else SamplingParams(temperature=0.0),
                arrival_step=arrival_steps[i] if arrival_steps else 0,
            )
            for i, p in enumerate(prompts)
        ]
        while not all(s.done for s in seqs):
            self._step(seqs, decode_first)
        return [s.tokens[s.prompt_len :] for s in seqs]

    def _step(self, seqs: list[_Seq], decode_first: bool) -> None:
        running = [s for s in seqs if not s.done and s.arrival_step <= self.step_id]
        chunks = [self._chunk(s) for s in running]
        chunks.sort(key=lambda c: c.is_decode != decode_first)
        out = self.runner.execute_model(SchedulerOutput(self.step_id, chunks))
        self.step_id += 1
        by_id = {s.request_id: s for s in running}
        for chunk, rid, token in zip(chunks, out.request_ids, out.sampled_token_ids, strict=True):
            assert rid == chunk.request_id
            seq = by_id[rid]
            seq.computed = chunk.end_pos
            assert (token is not None) == chunk.sample
            if token is not None:
                seq.tokens.append(token)
        for s in running:
            if s.done:
                self.free_blocks.extend(s.blocks)
                s.blocks = []

    def _chunk(self, s: _Seq) -> ScheduledChunk:
        remaining = len(s.tokens) - s.computed
        n = remaining if self.chunk_size is None else min(remaining, self.chunk_size)
        end = s.computed + n
        block_size = self.runner.block_size
        while len(s.blocks) * block_size < end:
            s.blocks.append(self.free_blocks.pop())
        return ScheduledChunk(
            request_id=s.request_id,
            token_ids=s.tokens[s.computed : end],
            start_pos=s.computed,
            block_ids=list(s.blocks),
            sample=end == len(s.tokens),
            sampling_params=s.params,
            num_generated=s.num_generated,
        )
