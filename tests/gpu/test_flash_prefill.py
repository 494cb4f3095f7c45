"""FlashAttention (torch SDPA) for prefill chunks without a cached prefix, on the GPU.

The Triton backend with `flash_prefill` on must give what the paged kernel gives (and what a
float64 dense reference gives, within bf16/fp16 rounding) for mixed steps: decodes, chunks after
a cached prefix, fresh chunks of lengths that are not multiples of the block size; the KV cache
is written identically either way. Then through a model: the final hidden states of a prompt
match between `prefill_attention: auto` and `paged`, and the engine config reaches the backend.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.model_folders import SHAPES, write_model_folder
from engine.batch import ScheduledChunk
from engine.config import EngineConfig, ModelConfig
from engine.sampling_params import SamplingParams
from tests.gpu.attention_cases import dense_reference, make_case, relative_error

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

CUDA = torch.device("cuda")
BOUND = 1e-2  # bf16/fp16 inputs against float64 (see test_triton_attention.py)

# (cached context, new tokens) per chunk
MIXED = [(0, 700), (9, 1), (64, 100), (0, 37), (0, 1), (0, 513), (300, 257), (0, 2), (5, 1)]
ONE_PROMPT = [(0, 1100)]  # the step is one fresh chunk: its output is returned as it comes
FRESH_ONLY = [(0, 17), (0, 250), (0, 600), (0, 31)]


def expected_flash(shapes: list[tuple[int, int]], window: int | None) -> list[int]:
    """Chunks FlashAttention should take with the minimum length lowered to 2."""
    return [
        i
        for i, (ctx, n) in enumerate(shapes)
        if ctx == 0 and n >= 2 and (window is None or n <= window)
    ]


def run_backend(case, heads: tuple[int, int, int], window: int | None, flash: bool):
    from worker.attention.triton_paged import TritonPagedAttention

    backend = TritonPagedAttention(*heads, flash_prefill=flash)
    backend.flash_min_tokens = 2  # cover short chunks too
    meta = backend.prepare_inputs(case.chunks, 16, CUDA, window).attn
    cache = case.cache.clone()
    backend.write_kv(cache, case.new_k, case.new_v, meta)
    out = backend.attend(case.q, case.new_k, case.new_v, cache, meta)
    return out, cache, meta


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("window", [None, 40], ids=["full", "window40"])
@pytest.mark.parametrize(
    "shapes", [MIXED, ONE_PROMPT, FRESH_ONLY], ids=["mixed", "one-prompt", "fresh-only"]
)
@pytest.mark.parametrize(
    "heads", [(32, 8, 128), (9, 3, 64), (4, 4, 32)], ids=["gqa4-hd128", "gqa3-hd64", "mha-hd32"]
)
def test_flash_matches_paged_and_float64(dtype, window, shapes, heads) -> None:
    case = make_case(shapes, *heads, 16, dtype, "cuda", seed=len(shapes))
    ref = dense_reference(case, window)
    paged, paged_cache, paged_meta = run_backend(case, heads, window, flash=False)
    flash, flash_cache, flash_meta = run_backend(case, heads, window, flash=True)
    assert paged_meta.flash == []
    starts = [sum(n for _, n in shapes[:i]) for i in range(len(shapes))]
    want = expected_flash(shapes, window)
    assert [f.token_start for f in flash_meta.flash] == [starts[i] for i in want]
    err_flash, err_paged = relative_error(flash, ref), relative_error(paged, ref)
    gap = relative_error(flash, paged.double().cpu())
    print(f"rel err flash {err_flash:.2e} paged {err_paged:.2e}; flash vs paged {gap:.2e}")
    assert err_flash < BOUND and err_paged < BOUND and gap < 2 * BOUND
    assert torch.equal(flash_cache, paged_cache)  # the same K/V written, nothing else touched


def test_flash_attention_takes_the_model_layout() -> None:
    """q/k/v as the model passes them (views of one qkv output, rows strided, GQA kv heads)
    run on the FlashAttention kernel itself: with every other SDPA backend disabled the call
    must not fail, and the result matches the paged kernel."""
    from worker.attention.triton_paged import TritonPagedAttention

    heads, kvh, hd, n = 32, 8, 128, 1000
    gen = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(n, heads + 2 * kvh, hd, device="cuda", dtype=torch.bfloat16, generator=gen)
    q, k, v = qkv[:, :heads], qkv[:, heads : heads + kvh], qkv[:, heads + kvh :]
    chunk = ScheduledChunk("r", [0] * n, 0, list(range(-(-n // 16))), True, SamplingParams())
    cache = torch.zeros(-(-n // 16), 2, 16, kvh, hd, device="cuda", dtype=torch.bfloat16)
    outs = {}
    for flash in (False, True):
        backend = TritonPagedAttention(heads, kvh, hd, flash_prefill=flash)
        meta = backend.prepare_inputs([chunk], 16, CUDA, None).attn
        assert len(meta.flash) == int(flash)  # 1000 tokens: over the default minimum
        backend.write_kv(cache, k, v, meta)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            outs[flash] = backend.attend(q, k, v, cache, meta)
    assert relative_error(outs[True], outs[False].double().cpu()) < 2 * BOUND


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M's shape (9 query heads over 3 kv heads, head_dim 64), random weights."""
    return write_model_folder(tmp_path_factory.mktemp("smollm2"), SHAPES["smollm2-135m"])


def test_model_hidden_states_match_between_settings(small_model: Path) -> None:
    """A 900-token prompt and, in the same step, a chunk after a 600-token prefix: the final
    hidden states with FlashAttention on and off agree to bf16 rounding through 30 layers."""
    from worker.model_runner import ModelRunner

    runner = ModelRunner(
        small_model,
        dtype="bfloat16",
        device="cuda",
        num_blocks=256,
        cuda_graphs=False,
        load_format="random",
    )
    attention = runner.attention
    assert attention.flash_prefill  # auto, bf16
    gen = torch.Generator().manual_seed(1)
    vocab = runner.config.vocab_size
    prompt = torch.randint(2, vocab, (900,), generator=gen).tolist()
    prefix = torch.randint(2, vocab, (700,), generator=gen).tolist()
    params = SamplingParams(temperature=0)
    # Write the second request's first 600 positions into the cache (a fresh chunk, paged).
    attention.flash_prefill = False
    second_blocks = list(range(100, 144))
    warm = ScheduledChunk("b", prefix[:600], 0, second_blocks, True, params)
    _hidden(runner, [warm])
    step = [
        ScheduledChunk("a", prompt, 0, list(range(57)), True, params),
        ScheduledChunk("b", prefix[600:], 600, second_blocks, True, params),
    ]
    hidden = {}
    for flash in (False, True):
        attention.flash_prefill = flash
        hidden[flash] = _hidden(runner, step)
    gap = relative_error(hidden[True], hidden[False].double().cpu())
    print(f"final hidden states, flash vs paged: rel diff {gap:.2e}")
    # bf16 rounding differs between the two kernels and grows through the layers; a wrong row,
    # head or mask would differ by O(1).
    assert gap < 5e-2


def _hidden(runner, chunks: list[ScheduledChunk]) -> torch.Tensor:
    """Final-norm hidden states `[T, H]` of one step's chunks (their K/V written)."""
    inputs = runner.attention.prepare_inputs(
        chunks, runner.block_size, runner.device, None, runner.block_tables
    )
    return runner.model.forward(
        inputs.input_ids, inputs.positions, inputs.attn, runner.kv_cache.layers
    )


@pytest.mark.parametrize(
    ("setting", "dtype", "flash"),
    [("auto", "bfloat16", True), ("paged", "bfloat16", False), ("auto", "float32", False)],
)
def test_engine_config_reaches_the_backend(small_model: Path, setting, dtype, flash) -> None:
    from worker.engine_core import EngineCore

    engine = EngineConfig.model_validate(
        {
            "prefill_attention": setting,
            "warmup": False,  # only the setting's way to the backend is under test
            "cache": {"num_blocks": 64},
            "scheduler": {"max_num_seqs": 2},
        }
    )
    model = ModelConfig(path=str(small_model), device="cuda", dtype=dtype, load_format="random")
    core = EngineCore(model, engine, cuda_graphs=False)
    assert core.runner.attention.name == "triton"
    assert core.runner.attention.flash_prefill is flash
