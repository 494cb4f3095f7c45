"""Load a Llama-family model from a local Hugging Face folder of safetensors.

Reads `model.safetensors` or the shards named by `model.safetensors.index.json`, checks every
tensor's presence and shape, converts to the serving dtype and fuses q/k/v and gate/up.
`load_format="random"` builds the folder's config.json with random weights instead (see
worker/random_weights.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from worker.attention import AttentionBackend
from worker.model_config import ModelArchConfig, ModelLoadError, load_model_config
from worker.models import LayerWeights, LlamaForCausalLM, ModelWeights, get_model_class
from worker.random_weights import random_weights

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPES |= {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype, config: ModelArchConfig) -> torch.dtype:
    """The torch dtype to serve in; "auto" means the checkpoint's own."""
    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    else:
        name = config.torch_dtype if dtype == "auto" else dtype
    if name not in _DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not supported (float32, bfloat16, float16)")
    return _DTYPES[name]


def load_model(
    model_path: str | Path,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    attention: AttentionBackend | None = None,
    load_format: str = "safetensors",
) -> LlamaForCausalLM:
    config = load_model_config(model_path)
    torch_dtype = resolve_dtype(dtype, config)
    if load_format == "random":
        weights = random_weights(config, torch_dtype, torch.device(device))
    elif load_format == "safetensors":
        with _CheckpointReader(Path(model_path)) as reader:
            weights = _read_weights(reader, config, torch_dtype, torch.device(device))
    else:
        raise ModelLoadError(f"load_format {load_format!r} is not one of: safetensors, random")
    return get_model_class(config.architecture)(config, weights, attention)


class _CheckpointReader:
    """Tensors by Hugging Face name, across one file or an index of shards."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.file_of = _tensor_files(folder)
        self._handles: dict[str, object] = {}

    def __enter__(self) -> _CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._handles.clear()

    def has(self, name: str) -> bool:
        return name in self.file_of

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in self.file_of:
            raise ModelLoadError(f"missing tensor {name} in {self.folder}")
        file = self.file_of[name]
        if file not in self._handles:
            self._handles[file] = safe_open(str(self.folder / file), framework="pt", device="cpu")
        tensor = self._handles[file].get_tensor(name)  # type: ignore[attr-defined]
        if tuple(tensor.shape) != shape:
            raise ModelLoadError(
                f"tensor {name} in {self.folder} has shape {tuple(tensor.shape)}, expected {shape}"
            )
        return tensor


def _tensor_files(folder: Path) -> dict[str, str]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelLoadError(f"cannot read {index}: {type(e).__name__}: {e}") from None
        missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        if missing:
            raise ModelLoadError(f"shard {missing[0]} named by {index} is missing")
        return dict(weight_map)
    single = folder / "model.safetensors"
    if not single.is_file():
        raise ModelLoadError(f"no model.safetensors or model.safetensors.index.json in {folder}")
    try:
        with safe_open(str(single), framework="pt", device="cpu") as f:
            return dict.fromkeys(f.keys(), single.name)
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ModelLoadError(f"cannot read {single}: {e}") from None


def _read_weights(
    reader: _CheckpointReader, config: ModelArchConfig, dtype: torch.dtype, device: torch.device
) -> ModelWeights:
    def vector(name: str, size: int) -> torch.Tensor:
        return reader.get(name, (size,)).to(device=device, dtype=dtype)

    hidden, vocab = config.hidden_size, config.vocab_size
    embed = _convert([reader.get("model.embed_tokens.weight", (vocab, hidden))], dtype, device)
    lm_head = embed  # tied: one table serves both
    if not config.tie_word_embeddings:
        lm_head = _convert([reader.get("lm_head.weight", (vocab, hidden))], dtype, device)
    layers = [_read_layer(reader, config, i, dtype, device) for i in range(config.num_layers)]
    return ModelWeights(
        embed=embed,
        lm_head=lm_head,
        final_norm=vector("model.norm.weight", hidden),
        layers=layers,
    )


def _read_layer(
    reader: _CheckpointReader,
    config: ModelArchConfig,
    index: int,
    dtype: torch.dtype,
    device: torch.device,
) -> LayerWeights:
    p = f"model.layers.{index}."
    hidden, inter, hd = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.q_size, config.kv_size

    def get(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return reader.get(p + name, shape)

    def fused(names: list[str], rows: list[int], cols: int) -> torch.Tensor:
        return _convert(
            [get(n, (r, cols)) for n, r in zip(names, rows, strict=True)], dtype, device
        )

    def bias(names: list[str], sizes: list[int], present: bool) -> torch.Tensor | None:
        if not present:
            return None
        parts = [get(n, (s,)) for n, s in zip(names, sizes, strict=True)]
        return torch.cat(parts).to(device=device, dtype=dtype)

    attn = ["self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj."]
    mlp = ["mlp.gate_proj.", "mlp.up_proj."]
    qk_norm = None
    if config.qk_norm:
        q_w = get("self_attn.q_norm.weight", (hd,)).expand(config.num_heads, hd)
        k_w = get("self_attn.k_norm.weight", (hd,)).expand(config.num_kv_heads, hd)
        qk_norm = torch.cat([q_w, k_w]).to(device=device, dtype=dtype)  # [heads + kvh, hd]
    return LayerWeights(
        input_norm=get("input_layernorm.weight", (hidden,)).to(device=device, dtype=dtype),
        qkv=fused([n + "weight" for n in attn], [q, kv, kv], hidden),
        qkv_bias=bias([n + "bias" for n in attn], [q, kv, kv], config.qkv_bias),
        qk_norm=qk_norm,
        o_proj=fused(["self_attn.o_proj.weight"], [hidden], q),
        o_bias=bias(["self_attn.o_proj.bias"], [hidden], config.o_bias),
        post_norm=get("post_attention_layernorm.weight", (hidden,)).to(device=device, dtype=dtype),
        gate_up=fused([n + "weight" for n in mlp], [inter, inter], hidden),
        gate_up_bias=bias([n + "bias" for n in mlp], [inter, inter], config.mlp_bias),
        down=fused(["mlp.down_proj.weight"], [hidden], inter),
        down_bias=bias(["mlp.down_proj.bias"], [hidden], config.mlp_bias),
    )


def _convert(parts: list[torch.Tensor], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """HF `[out, in]` matrices stacked along out, in the serving dtype, on the device."""
    stacked = parts[0] if len(parts) == 1 else torch.cat(parts)  # [sum(out), in]
    return stacked.to(device=device, dtype=dtype).contiguous()
