"""Random weights for a model folder's config.json: `model.load_format: random`.

For benchmarks and smoke tests of the serving path at a real model's shape without its
checkpoint (an 8B checkpoint takes longer to write and read than a benchmark runs). Weights are
drawn on the target device from a fixed seed, so every instance of a deployment -- a prefill and
a decode instance in particular -- builds the same model on the same kind of device. Matrices
are scaled by 1/sqrt(fan_in) so activations stay O(1) through the layers.
"""

from __future__ import annotations

import torch

from worker.distributed import ShardLayout, shard_layout
from worker.model_config import ModelArchConfig
from worker.models import LayerWeights, ModelWeights

RANDOM_WEIGHTS_SEED = 0


def random_weights(
    config: ModelArchConfig,
    dtype: torch.dtype,
    device: torch.device,
    layout: ShardLayout | None = None,
) -> ModelWeights:
    """The whole model's weights, or under tensor parallelism rank `layout.rank`'s shard of the
    very same model: each whole tensor is drawn in the same order and sliced (a layer's largest
    tensor at a time is the only extra memory)."""
    c = config
    shard = layout or shard_layout(config, 0, 1)
    first = shard.rank == 0
    gen = torch.Generator(device=device).manual_seed(RANDOM_WEIGHTS_SEED)

    def matrix(rows: int, cols: int) -> torch.Tensor:
        w = torch.randn(rows, cols, device=device, dtype=dtype, generator=gen)
        return w.mul_(cols**-0.5)  # [out, in]

    def ones(*shape: int) -> torch.Tensor:
        return torch.ones(*shape, device=device, dtype=dtype)

    def bias(size: int, present: bool) -> torch.Tensor | None:
        if not present:
            return None
        return torch.randn(size, device=device, dtype=dtype, generator=gen).mul_(0.02)

    def qkv_part(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else shard.shard_qkv(t, c).contiguous()

    def gate_up_part(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else shard.shard_gate_up(t).contiguous()

    def layer() -> LayerWeights:
        qkv_rows = c.q_size + 2 * c.kv_size
        qkv, qkv_bias = matrix(qkv_rows, c.hidden_size), bias(qkv_rows, c.qkv_bias)
        o_proj, o_bias = matrix(c.hidden_size, c.q_size), bias(c.hidden_size, c.o_bias)
        gate_up = matrix(2 * c.intermediate_size, c.hidden_size)
        gate_up_bias = bias(2 * c.intermediate_size, c.mlp_bias)
        down, down_bias = (
            matrix(c.hidden_size, c.intermediate_size),
            bias(c.hidden_size, c.mlp_bias),
        )
        heads = shard.heads + shard.kv_heads
        return LayerWeights(
            input_norm=ones(c.hidden_size),
            qkv=qkv_part(qkv),
            qkv_bias=qkv_part(qkv_bias),
            qk_norm=ones(heads, c.head_dim) if c.qk_norm else None,
            o_proj=o_proj[:, shard.q_rows(c.head_dim)].contiguous(),
            o_bias=o_bias if first else None,  # row-parallel: added once
            post_norm=ones(c.hidden_size),
            gate_up=gate_up_part(gate_up),
            gate_up_bias=gate_up_part(gate_up_bias),
            down=down[:, shard.inter_rows()].contiguous(),
            down_bias=down_bias if first else None,
        )

    layers = [layer() for _ in range(c.num_layers)]
    embed = matrix(c.vocab_size, c.hidden_size)
    lm_head = embed if c.tie_word_embeddings else matrix(c.vocab_size, c.hidden_size)
    embed_shard = shard.shard_vocab(embed).contiguous()
    lm_head_shard = embed_shard if lm_head is embed else shard.shard_vocab(lm_head).contiguous()
    return ModelWeights(
        embed=embed_shard,
        lm_head=lm_head_shard,
        final_norm=ones(c.hidden_size),
        layers=layers,
        vocab_start=shard.vocab_start,
    )
