"""The architecture of a Llama-family checkpoint, read from its Hugging Face `config.json`.

Only what the model code needs is kept. Both config layouts are read: transformers < 5 writes
`rope_theta` and `rope_scaling` at the top level, transformers >= 5 nests them in
`rope_parameters`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import PdserveError

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")
_DTYPE_NAMES = {"float32": "float32", "float": "float32", "bfloat16": "bfloat16"}
_DTYPE_NAMES |= {"float16": "float16", "half": "float16"}


class ModelLoadError(PdserveError, ValueError):
    """A model folder cannot be served; the message is one line that says why."""


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling ("llama3" or "linear"); the config holds None for plain RoPE."""

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelArchConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2 always; Llama/Qwen3 when attention_bias
    o_bias: bool  # Llama/Qwen3 attention_bias also biases o_proj (Qwen2 does not)
    mlp_bias: bool
    qk_norm: bool  # Qwen3: RMSNorm over each q and k head before RoPE
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...]
    torch_dtype: str  # the checkpoint's own dtype name ("bfloat16", ...)
    sliding_window: int | None = None  # Mistral: a key is seen while q_pos - k_pos < window

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads


def load_model_config(model_path: str | Path) -> ModelArchConfig:
    """Parse `<model_path>/config.json`; raises ModelLoadError when it cannot be served."""
    raw = read_config_json(model_path)
    try:
        return parse_model_config(raw)
    except ModelLoadError as e:
        raise ModelLoadError(f"{model_path}: {e}") from None


def read_config_json(model_path: str | Path) -> dict[str, Any]:
    path = Path(model_path)
    if not path.is_dir():
        raise ModelLoadError(f"model folder {path} does not exist")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"no config.json in {path}")
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelLoadError(f"cannot read {config_file}: {first_line}") from None
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{config_file} is not a JSON object")
    return raw


def parse_model_config(raw: dict[str, Any]) -> ModelArchConfig:
    """Build the config from an already-parsed config.json dict."""
    arch = _architecture(raw)
    if raw.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(f"hidden_act {raw['hidden_act']!r} is not supported (only silu)")
    hidden = _int(raw, "hidden_size")
    heads = _int(raw, "num_attention_heads")
    kv_heads = _int(raw, "num_key_value_heads", default=heads)
    if heads % kv_heads != 0:
        raise ModelLoadError(
            f"num_attention_heads {heads} is not a multiple of kv heads {kv_heads}"
        )
    head_dim = raw.get("head_dim") or hidden // heads
    attention_bias = bool(raw.get("attention_bias", False))
    is_qwen2 = arch == "Qwen2ForCausalLM"
    return ModelArchConfig(
        architecture=arch,
        vocab_size=_int(raw, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_int(raw, "intermediate_size"),
        num_layers=_int(raw, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(head_dim),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(raw),
        rope_scaling=_rope_scaling(raw),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=is_qwen2 or attention_bias,
        o_bias=attention_bias and not is_qwen2,
        mlp_bias=bool(raw.get("mlp_bias", False)),
        qk_norm=arch == "Qwen3ForCausalLM",
        max_position_embeddings=_int(raw, "max_position_embeddings", default=4096),
        eos_token_ids=_eos_ids(raw.get("eos_token_id")),
        torch_dtype=_dtype_name(raw),
        sliding_window=_sliding_window(raw, arch),
    )


def _architecture(raw: dict[str, Any]) -> str:
    archs = raw.get("architectures") or []
    if not isinstance(archs, list) or not archs:
        raise ModelLoadError("config.json has no 'architectures' entry")
    arch = archs[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        raise ModelLoadError(f"architecture {arch} is not supported (supported: {supported})")
    return arch


def _int(raw: dict[str, Any], key: str, default: int | None = None) -> int:
    value = raw.get(key, default)
    if value is None:
        raise ModelLoadError(f"config.json has no {key!r}")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelLoadError(f"config.json {key!r} must be a positive integer, got {value!r}")
    return value


def _rope_dict(raw: dict[str, Any]) -> dict[str, Any]:
    # transformers 5 writes rope_parameters; older configs write rope_scaling (None = plain RoPE).
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ModelLoadError(f"config.json rope parameters must be an object, got {params!r}")
    return params


def _rope_theta(raw: dict[str, Any]) -> float:
    theta = _rope_dict(raw).get("rope_theta", raw.get("rope_theta", 10000.0))
    return float(theta)


def _rope_scaling(raw: dict[str, Any]) -> RopeScaling | None:
    params = _rope_dict(raw)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        supported = ", ".join(SUPPORTED_ROPE_TYPES)
        raise ModelLoadError(f"rope_type {rope_type!r} is not supported (supported: {supported})")
    if rope_type == "default":
        return None
    if "factor" not in params:
        raise ModelLoadError(f"rope_type {rope_type!r} needs a 'factor'")
    original = params.get("original_max_position_embeddings", raw.get("max_position_embeddings"))
    return RopeScaling(
        rope_type=rope_type,
        factor=float(params["factor"]),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(original or 8192),
    )


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, int) for v in value):
        return tuple(value)
    raise ModelLoadError(
        f"config.json eos_token_id must be an int or a list of ints, got {value!r}"
    )


def _dtype_name(raw: dict[str, Any]) -> str:
    # transformers 5 writes "dtype", older versions "torch_dtype".
    name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    return _DTYPE_NAMES.get(str(name), "float32")


def _sliding_window(raw: dict[str, Any], arch: str) -> int | None:
    window = raw.get("sliding_window")
    if arch == "MistralForCausalLM":
        return int(window) if window else None
    if raw.get("use_sliding_window") and window:
        # Qwen applies the window to some layers only; one window for all layers would be wrong.
        raise ModelLoadError(f"{arch} with use_sliding_window is not supported")
    return None
