from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.batch import ScheduledChunk
from engine.sampling_params import SamplingParams
from tests.unit.worker.conftest import CHECKPOINTS, make_prompts
from worker.attention import prepare_step_inputs
from worker.kv_cache import KVCache, make_kv_cache_spec
from worker.loader import load_model
from worker.model_config import ModelLoadError
from worker.models.llama import LlamaForCausalLM, rope_inv_freq


def _prefill_logits(model: LlamaForCausalLM, prompt: list[int]) -> torch.Tensor:
    """Logits `[len(prompt), V]` of one prompt run as a single chunk."""
    block_size = 8
    num_blocks = -(-len(prompt) // block_size)
    spec = make_kv_cache_spec(model.config, num_blocks, block_size, model.dtype)
    cache = KVCache.allocate(spec, "cpu")
    chunk = ScheduledChunk("r", prompt, 0, list(range(num_blocks)), True, SamplingParams())
    inputs = prepare_step_inputs(
        [chunk], block_size, torch.device("cpu"), model.config.sliding_window
    )
    hidden = model.forward(inputs.input_ids, inputs.positions, inputs.attn, cache.layers)
    return model.compute_logits(hidden)


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_logits_match_transformers(checkpoints, name: str) -> None:
    ckpt = checkpoints[name]
    model = load_model(ckpt.path, "float32")
    prompt = make_prompts(1, seed=7, min_len=30, max_len=30)[0]
    with torch.no_grad():
        expected = ckpt.hf_model(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(_prefill_logits(model, prompt), expected, atol=1e-4, rtol=1e-4)


def test_llama3_rope_frequencies_match_transformers(checkpoints) -> None:
    ckpt = checkpoints["llama3_rope"]
    model = load_model(ckpt.path, "float32")
    expected = ckpt.hf_model.model.rotary_emb.inv_freq
    torch.testing.assert_close(rope_inv_freq(model.config), expected, atol=0, rtol=0)


def test_sharded_checkpoint_and_tied_embeddings(checkpoints, tmp_path: Path) -> None:
    ckpt = checkpoints["llama_tied"]
    ckpt.hf_model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    sharded = load_model(tmp_path, "float32")
    single = load_model(ckpt.path, "float32")
    # Tied: the checkpoint has no lm_head of its own; the embedding table serves.
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert "lm_head.weight" not in weight_map
    prompt = make_prompts(1, seed=3)[0]
    torch.testing.assert_close(_prefill_logits(sharded, prompt), _prefill_logits(single, prompt))


def test_half_precision_loads_and_stays_close(checkpoints) -> None:
    ckpt = checkpoints["qwen3"]
    prompt = make_prompts(1, seed=5, min_len=20, max_len=20)[0]
    fp32 = _prefill_logits(load_model(ckpt.path, "float32"), prompt)
    for dtype in ("bfloat16", torch.float16):
        model = load_model(ckpt.path, dtype)
        assert model.weights.layers[0].qkv.dtype == model.dtype != torch.float32
        logits = _prefill_logits(model, prompt).float()
        assert (logits - fp32).abs().max() < 0.15 * fp32.abs().max()


def _copy_without(src: Path, dst: Path, drop: str) -> Path:
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = load_file(src / "model.safetensors")
    del tensors[drop]
    save_file(tensors, dst / "model.safetensors")
    return dst


def test_missing_tensor_and_shape_mismatch_are_clear(checkpoints, tmp_path: Path) -> None:
    src = checkpoints["llama"].path
    name = "model.layers.1.mlp.up_proj.weight"
    with pytest.raises(ModelLoadError, match=f"missing tensor {name} in"):
        load_model(_copy_without(src, tmp_path / "missing", name))

    wrong = tmp_path / "wrong"
    shutil.copytree(src, wrong)
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(ModelLoadError, match=r"has shape \(128, 64\), expected \(96, 64\)"):
        load_model(wrong)

    (wrong / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no model\.safetensors"):
        load_model(wrong)
