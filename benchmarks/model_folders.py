"""Model folders for random-weight runs (`model.load_format: random`): a config.json and a
word-level tokenizer covering the whole vocabulary, so the router serves the model unchanged.

Token i is the word "w<i>" (0 and 1 are <s> and </s>), so every id decodes to its own text:
completions compare token for token by comparing text. Prompts are sent as token-id lists.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

_LLAMA = {"architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "rms_norm_eps": 1e-5}
SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": _LLAMA
    | {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "rope_theta": 500000.0,
        "max_position_embeddings": 8192,
        "torch_dtype": "bfloat16",
    },
    "smollm2-135m": _LLAMA
    | {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "rope_theta": 100000.0,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
    },
}


def write_word_tokenizer(folder: Path, vocab_size: int) -> None:
    """tokenizer.json, tokenizer_config.json and generation_config.json (eos: </s> = 1)."""
    vocab = {"<s>": 0, "</s>": 1} | {f"w{i}": i for i in range(2, vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<s>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    backend.add_special_tokens(["<s>", "</s>"])
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 1}))


def write_model_folder(folder: Path, config: dict[str, Any]) -> Path:
    """A folder serving `config` with random weights: config.json plus the word tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    write_word_tokenizer(folder, int(config["vocab_size"]))
    return folder


def write_byte_tokenizer(folder: Path, chat_template: str | None = None) -> Path:
    """A byte-level BPE without merges (one token per byte) plus <s>=0 and </s>=1, saved as a
    tokenizer folder (with `chat_template` when given)."""
    vocab = {"<s>": 0, "</s>": 1}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<s>", "</s>"])
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    config: dict[str, Any] = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 1}))
    return folder
