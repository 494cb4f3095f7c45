"""Load a Llama-family model from a local Hugging Face folder of safetensors.

Reads `model.safetensors` or the shards named by `model.safetensors.index.json`, checks every
tensor's presence and shape, converts to the serving dtype and fuses q/k/v and gate/up. Under
tensor parallelism each rank reads only its own slice of every tensor (safetensors slices the
file lazily; see worker/distributed.py for which slice).
`load_format="random"` builds the folder's config.json with random weights instead (see
worker/random_weights.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from worker.attention import AttentionBackend
from worker.distributed import ShardLayout, TPGroup, local_config, pad_rows, shard_layout
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
    tp: TPGroup | None = None,
) -> LlamaForCausalLM:
    """The model, or under `tp` this rank's shard of it (its config is then the local one)."""
    config = load_model_config(model_path)
    torch_dtype = resolve_dtype(dtype, config)
    layout = shard_layout(config, tp.rank, tp.size) if tp else shard_layout(config, 0, 1)
    if load_format == "random":
        weights = random_weights(config, torch_dtype, torch.device(device), layout)
    elif load_format == "safetensors":
        with _CheckpointReader(Path(model_path)) as reader:
            weights = _read_weights(reader, config, torch_dtype, torch.device(device), layout)
    else:
        raise ModelLoadError(f"load_format {load_format!r} is not one of: safetensors, random")
    model_class = get_model_class(config.architecture)
    return model_class(local_config(config, layout), weights, attention, tp)


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

    def get(
        self,
        name: str,
        shape: tuple[int, ...],
        rows: slice | None = None,
        cols: slice | None = None,
    ) -> torch.Tensor:
        """Tensor `name` (checked to have `shape`), or only its `rows` / `cols`, read lazily."""
        if name not in self.file_of:
            raise ModelLoadError(f"missing tensor {name} in {self.folder}")
        file = self.file_of[name]
        if file not in self._handles:
            self._handles[file] = safe_open(str(self.folder / file), framework="pt", device="cpu")
        lazy = self._handles[file].get_slice(name)  # type: ignore[attr-defined]
        if tuple(lazy.get_shape()) != shape:
            raise ModelLoadError(
                f"tensor {name} in {self.folder} has shape {tuple(lazy.get_shape())}, "
                f"expected {shape}"
            )
        everything = slice(None)
        if cols is not None:
            return lazy[rows or everything, cols]
        return lazy[rows or everything]


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
    reader: _CheckpointReader,
    config: ModelArchConfig,
    dtype: torch.dtype,
    device: torch.device,
    layout: ShardLayout,
) -> ModelWeights:
    def vocab_table(name: str) -> torch.Tensor:
        rows = slice(layout.vocab_start, min(layout.vocab_end, config.vocab_size))
        table = reader.get(name, (config.vocab_size, config.hidden_size), rows)  # [<= Vr, H]
        return _convert([pad_rows(table, layout.vocab_rows)], dtype, device)  # [Vr, H]

    embed = vocab_table("model.embed_tokens.weight")
    lm_head = embed  # tied: one table serves both
    if not config.tie_word_embeddings:
        lm_head = vocab_table("lm_head.weight")
    layers = [
        _read_layer(reader, config, i, dtype, device, layout) for i in range(config.num_layers)
    ]
    final_norm = reader.get("model.norm.weight", (config.hidden_size,))
    return ModelWeights(
        embed=embed,
        lm_head=lm_head,
        final_norm=final_norm.to(device=device, dtype=dtype),
        layers=layers,
        vocab_start=layout.vocab_start,
    )


def _read_layer(
    reader: _CheckpointReader,
    config: ModelArchConfig,
    index: int,
    dtype: torch.dtype,
    device: torch.device,
    layout: ShardLayout,
) -> LayerWeights:
    """Layer `index`'s weights: whole, or the rank's slice (column-parallel q/k/v and gate/up
    by rows; row-parallel o_proj and down by columns, their biases on rank 0 only)."""
    p = f"model.layers.{index}."
    hidden, inter, hd = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.q_size, config.kv_size
    q_rows, kv_rows, inter_rows = layout.q_rows(hd), layout.kv_rows(hd), layout.inter_rows()
    qkv_parts = [("q_proj.", q, q_rows), ("k_proj.", kv, kv_rows), ("v_proj.", kv, kv_rows)]
    gate_up_parts = [("gate_proj.", inter, inter_rows), ("up_proj.", inter, inter_rows)]

    def on_device(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype)

    def column_parallel(prefix: str, parts: list, suffix: str) -> torch.Tensor:
        """The parts' rows stacked: weights `[rows, H]` (suffix "weight") or biases `[rows]`."""
        shape = (lambda size: (size, hidden)) if suffix == "weight" else (lambda size: (size,))
        tensors = [
            reader.get(p + prefix + name + suffix, shape(size), rows) for name, size, rows in parts
        ]
        return _convert(tensors, dtype, device)

    def row_parallel(name: str, cols_total: int, cols: slice) -> torch.Tensor:
        weight = reader.get(p + name + "weight", (hidden, cols_total), None, cols)  # [H, cols]
        return _convert([weight], dtype, device)

    def row_bias(name: str, present: bool) -> torch.Tensor | None:
        if not present or layout.rank != 0:  # added once, before the all-reduce
            return None
        return on_device(reader.get(p + name + "bias", (hidden,)))

    qk_norm = None
    if config.qk_norm:
        q_w = reader.get(p + "self_attn.q_norm.weight", (hd,)).expand(layout.heads, hd)
        k_w = reader.get(p + "self_attn.k_norm.weight", (hd,)).expand(layout.kv_heads, hd)
        qk_norm = on_device(torch.cat([q_w, k_w]))  # [heads_r + kvh_r, hd]
    return LayerWeights(
        input_norm=on_device(reader.get(p + "input_layernorm.weight", (hidden,))),
        qkv=column_parallel("self_attn.", qkv_parts, "weight"),
        qkv_bias=column_parallel("self_attn.", qkv_parts, "bias") if config.qkv_bias else None,
        qk_norm=qk_norm,
        o_proj=row_parallel("self_attn.o_proj.", q, q_rows),
        o_bias=row_bias("self_attn.o_proj.", config.o_bias),
        post_norm=on_device(reader.get(p + "post_attention_layernorm.weight", (hidden,))),
        gate_up=column_parallel("mlp.", gate_up_parts, "weight"),
        gate_up_bias=column_parallel("mlp.", gate_up_parts, "bias") if config.mlp_bias else None,
        down=row_parallel("mlp.down_proj.", inter, inter_rows),
        down_bias=row_bias("mlp.down_proj.", config.mlp_bias),
    )


def _convert(parts: list[torch.Tensor], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """HF `[out, in]` matrices stacked along out, in the serving dtype, on the device."""
    stacked = parts[0] if len(parts) == 1 else torch.cat(parts)  # [sum(out), in]
    return stacked.to(device=device, dtype=dtype).contiguous()
