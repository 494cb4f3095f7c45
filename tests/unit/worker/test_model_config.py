from __future__ import annotations

import json
from pathlib import Path

import pytest

from worker.model_config import ModelLoadError, load_model_config, parse_model_config

LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "max_position_embeddings": 131072,
    "eos_token_id": [128001, 128008, 128009],
    "torch_dtype": "bfloat16",
}


def test_parses_every_architecture(checkpoints) -> None:
    llama = load_model_config(checkpoints["llama"].path)
    assert llama.architecture == "LlamaForCausalLM"
    assert (llama.vocab_size, llama.hidden_size, llama.num_layers) == (256, 64, 2)
    assert (llama.num_heads, llama.num_kv_heads, llama.head_dim) == (4, 2, 16)
    assert llama.eos_token_ids == (2,)
    assert llama.rope_scaling is None and llama.torch_dtype == "float32"
    assert not (llama.qkv_bias or llama.qk_norm or llama.tie_word_embeddings)

    llama3 = load_model_config(checkpoints["llama3_rope"].path)
    assert llama3.rope_theta == 500000.0 and llama3.eos_token_ids == (2, 3)
    assert llama3.rope_scaling is not None and llama3.rope_scaling.rope_type == "llama3"
    assert llama3.rope_scaling.original_max_position_embeddings == 32

    assert load_model_config(checkpoints["llama_tied"].path).tie_word_embeddings
    assert load_model_config(checkpoints["mistral"].path).sliding_window == 12
    qwen2 = load_model_config(checkpoints["qwen2"].path)
    assert qwen2.qkv_bias and not qwen2.o_bias
    qwen3 = load_model_config(checkpoints["qwen3"].path)
    assert qwen3.qk_norm and qwen3.head_dim == 32 and not qwen3.qkv_bias


def test_reads_the_pre_transformers_5_layout() -> None:
    raw = dict(LLAMA31_8B)
    config = parse_model_config(raw)
    assert config.rope_theta == 500000.0 and config.head_dim == 128
    assert config.rope_scaling is not None and config.rope_scaling.factor == 8.0
    assert config.eos_token_ids == (128001, 128008, 128009)
    assert config.torch_dtype == "bfloat16"
    assert parse_model_config({**raw, "rope_scaling": None}).rope_scaling is None


def _write_config(folder: Path, raw: dict | str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = raw if isinstance(raw, str) else json.dumps(raw)
    (folder / "config.json").write_text(text)
    return folder


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        (lambda p: p / "nowhere", "does not exist"),
        (lambda p: p, "no config.json in"),
        (lambda p: _write_config(p / "bad", "{not json"), "cannot read"),
        (
            lambda p: _write_config(p / "gpt2", {"architectures": ["GPT2LMHeadModel"]}),
            "architecture GPT2LMHeadModel is not supported (supported: LlamaForCausalLM",
        ),
        (
            lambda p: _write_config(
                p / "yarn",
                {**LLAMA31_8B, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
            ),
            "rope_type 'yarn' is not supported",
        ),
    ],
)
def test_unservable_folders_raise_a_one_line_error(tmp_path: Path, setup, expected: str) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_model_config(setup(tmp_path))
    message = str(info.value)
    assert expected in message
    assert "\n" not in message
    assert isinstance(info.value, ValueError)
