"""Random weights for a model folder's config.json: `model.load_format: random`.

For benchmarks and smoke tests of the serving path at a real model's shape without its
checkpoint (an 8B checkpoint takes longer to write and read than a benchmark runs). Weights are
drawn on the target device from a fixed seed, so every instance of a deployment -- a prefill and
a decode instance in particular -- builds the same model on the same kind of device. Matrices
are scaled by 1/sqrt(fan_in) so activations stay O(1) through the layers.
"""

from __future__ import annotations

import torch

from worker.model_config import ModelArchConfig
from worker.models import LayerWeights, ModelWeights

RANDOM_WEIGHTS_SEED = 0


def random_weights(
    config: ModelArchConfig, dtype: torch.dtype, device: torch.device
) -> ModelWeights:
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

    c = config
    qkv_rows = c.q_size + 2 * c.kv_size
    layers = [
        LayerWeights(
            input_norm=ones(c.hidden_size),
            qkv=matrix(qkv_rows, c.hidden_size),
            qkv_bias=bias(qkv_rows, c.qkv_bias),
            qk_norm=ones(c.num_heads + c.num_kv_heads, c.head_dim) if c.qk_norm else None,
            o_proj=matrix(c.hidden_size, c.q_size),
            o_bias=bias(c.hidden_size, c.o_bias),
            post_norm=ones(c.hidden_size),
            gate_up=matrix(2 * c.intermediate_size, c.hidden_size),
            gate_up_bias=bias(2 * c.intermediate_size, c.mlp_bias),
            down=matrix(c.hidden_size, c.intermediate_size),
            down_bias=bias(c.hidden_size, c.mlp_bias),
        )
        for _ in range(c.num_layers)
    ]
    embed = matrix(c.vocab_size, c.hidden_size)
    lm_head = embed if c.tie_word_embeddings else matrix(c.vocab_size, c.hidden_size)
    return ModelWeights(embed=embed, lm_head=lm_head, final_norm=ones(c.hidden_size), layers=layers)
