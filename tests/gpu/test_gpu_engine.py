"""The GPU fast path end to end: EngineCore with the Triton backend, CUDA graphs and the overlap
schedule, against transformers on the same GPU, and overlap against sequential mode.

Token equality is asserted in fp32 (exact products in the kernels; tf32 stays off), where it is
robust; bf16 agreement with transformers is printed (two bf16 implementations drift apart after
a near-tie, which says nothing about either).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig, ModelConfig
from engine.request import Request
from engine.sampling_params import SamplingParams
from tests.unit.engine.helpers import assert_nothing_leaked
from tests.unit.worker.conftest import _COMMON, build_checkpoint, make_prompts, save_llama
from worker.engine_core import EngineCore

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

NEW_TOKENS = 40
MID = _COMMON | dict(
    vocab_size=4096,
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=4,
    num_attention_heads=16,
    num_key_value_heads=4,
    max_position_embeddings=2048,
)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, torch.nn.Module]]:
    root = tmp_path_factory.mktemp("gpu_ckpts")
    out = {name: (root / name, build_checkpoint(name, root / name)) for name in ("llama", "qwen3")}
    out["mistral"] = (root / "mistral", build_checkpoint("mistral", root / "mistral"))
    mid = save_llama(root / "mid", **MID)
    mid.generation_config.eos_token_id = None
    mid.generation_config.pad_token_id = 0
    out["mid"] = (root / "mid", mid)
    return out


def make_core(path: Path, dtype: str, overlap: bool, num_blocks: int = 256) -> EngineCore:
    engine = EngineConfig.model_validate(
        {
            "scheduler": {"max_num_seqs": 16, "max_num_batched_tokens": 96, "block_size": 16},
            "cache": {"num_blocks": num_blocks},
        }
    )
    model = ModelConfig(path=str(path), device="cuda", dtype=dtype)
    core = EngineCore(model, engine, overlap=overlap)
    assert core.runner.attention.name == "triton" and core.runner.graphs is not None
    return core


def generate(core: EngineCore, prompts: list[list[int]], eos: dict[int, int] | None = None):
    requests = []
    for i, prompt in enumerate(prompts):
        params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=not eos)
        eos_ids = (eos[i],) if eos and i in eos else (99999,)
        requests.append(Request(f"r{i}", prompt, params, eos_token_ids=eos_ids))
        core.add_request(requests[-1])
    while core.has_work():
        core.step()
        core.scheduler.check_invariants()
    assert_nothing_leaked(core.scheduler)
    return [r.output_token_ids for r in requests]


_ON_GPU: dict[tuple[int, torch.dtype], torch.nn.Module] = {}


def hf_greedy(model: torch.nn.Module, prompt: list[int], dtype: torch.dtype) -> list[int]:
    key = (id(model), dtype)
    if key not in _ON_GPU:  # a copy per dtype: converting in place would lose the fp32 weights
        _ON_GPU[key] = copy.deepcopy(model).to("cuda", dtype)
    model = _ON_GPU[key]
    with torch.no_grad():
        ids = torch.tensor([prompt], device="cuda")
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, len(prompt) :].tolist()


def prompts_for(vocab: int) -> list[list[int]]:
    shared = [t % vocab for t in make_prompts(1, seed=7, min_len=40, max_len=40)[0]]
    prompts = make_prompts(5, seed=3, max_len=60) + [shared + p for p in make_prompts(2, seed=5)]
    return [[t % vocab for t in p] for p in prompts]


@pytest.mark.parametrize("name", ["llama", "qwen3", "mistral", "mid"])
@pytest.mark.parametrize("overlap", [False, True], ids=["sequential", "overlap"])
def test_fp32_greedy_matches_transformers(models, name, overlap) -> None:
    path, hf_model = models[name]
    core = make_core(path, "float32", overlap)
    prompts = prompts_for(hf_model.config.vocab_size)
    got = generate(core, prompts)
    for prompt, tokens in zip(prompts, got, strict=True):
        assert tokens == hf_greedy(hf_model, prompt, torch.float32)
    assert core.runner.graphs.replays > 0


@pytest.mark.parametrize("name", ["llama", "mid"])
def test_bf16_agreement_with_transformers(models, name) -> None:
    path, hf_model = models[name]
    core = make_core(path, "bfloat16", overlap=True)
    prompts = prompts_for(hf_model.config.vocab_size)
    agree = []
    for prompt, tokens in zip(prompts, generate(core, prompts), strict=True):
        ref = hf_greedy(hf_model, prompt, torch.bfloat16)
        pairs = enumerate(zip(tokens, ref, strict=True))
        agree.append(next((i for i, (a, b) in pairs if a != b), len(ref)))
    print(f"{name} bf16: tokens equal to transformers before the first difference: {agree}")
    assert max(agree) >= 8  # informational beyond this: see the module docstring


def test_overlap_equals_sequential_with_eos_and_preemption(models) -> None:
    path, hf_model = models["mid"]
    prompts = prompts_for(hf_model.config.vocab_size) * 2
    reference = generate(make_core(path, "float32", overlap=False, num_blocks=1024), prompts)
    eos = {0: reference[0][3], 4: reference[4][10]}
    runs = []
    for overlap in (False, True):
        core = make_core(path, "float32", overlap=overlap, num_blocks=40)  # forces preemption
        runs.append(generate(core, prompts, eos))
        assert core.scheduler.num_preemptions > 0
    assert runs[0] == runs[1]
    assert len(runs[1][0]) == reference[0].index(eos[0]) + 1


def test_mixed_overlap_with_graphs_equals_sequential(models) -> None:
    """A colocated (mixed) instance under load: requests arrive while steps are in flight, so
    prefill chunks (eager) and decode-only steps (CUDA graphs) alternate; seeded sampling,
    penalties, logprobs, prefix hits and preemption included. Overlap == sequential."""
    from engine.config import Role
    from tests.unit.worker.test_mixed_overlap import assert_same, requests, run

    path, hf_model = models["mid"]
    vocab = hf_model.config.vocab_size
    prompts = prompts_for(vocab) * 3
    arrivals = lambda: [(3 * i, r) for i, r in enumerate(requests(prompts, NEW_TOKENS))]  # noqa: E731
    results = []
    for overlap in (False, True):
        engine = EngineConfig.model_validate(
            {
                "scheduler": {
                    "max_num_seqs": 16,
                    "max_num_batched_tokens": 64,
                    "block_size": 16,
                    "enable_prefix_caching": True,
                },
                "cache": {"num_blocks": 60},
            }
        )
        model = ModelConfig(path=str(path), device="cuda", dtype="float32")
        core = EngineCore(model, engine, Role.MIXED, overlap=overlap)
        assert core.runner.graphs is not None
        results.append(run(core, arrivals()))
        assert core.runner.graphs.replays > 0  # decode-only steps replayed graphs
        assert core.block_manager.prefix_hits > 0
    assert_same(results[0], results[1])
