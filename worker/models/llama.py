"""The Llama family (Llama 2/3, Mistral, Qwen2, Qwen3) over a flattened batch of tokens.

One model class; the variants differ only in config flags (qkv bias, per-head q/k norm, RoPE
scaling, tied embeddings). Built for low per-layer overhead:
- q/k/v and gate/up are fused into one matmul each at load time;
- on CPU the matmuls go to oneDNN with pre-packed weights (see worker/models/linear.py);
- RoPE and the Qwen3 head norm run on q and k together (they are adjacent in the qkv output);
- logits are computed only for rows that sample;
- on CUDA (with Triton) the residual add + RMSNorm, RoPE and SiLU * up are one kernel each
  (worker/models/triton_ops.py): small kernels, not matmuls, dominated a decode step's launches.

Under tensor parallelism (worker/distributed.py) the config is the rank's local one (its heads,
its MLP slice) and the weights are its shard; the model adds one all-reduce after o_proj, one
after down, one after the vocab-parallel embedding lookup, and gathers the logits. Row-parallel
biases are held by rank 0 only, so they are added once.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from worker.attention import AttentionBackend, AttentionMetadata, TorchPagedAttention
from worker.distributed import TPGroup
from worker.model_config import ModelArchConfig
from worker.models.linear import select_linear


@dataclass
class LayerWeights:
    """One decoder layer. Matrices are `[out, in]`, as in Hugging Face checkpoints."""

    input_norm: torch.Tensor  # [H]
    qkv: torch.Tensor  # [(heads + 2 * kv_heads) * hd, H]
    qkv_bias: torch.Tensor | None  # [(heads + 2 * kv_heads) * hd]
    qk_norm: torch.Tensor | None  # [heads + kv_heads, hd]: q heads' weights, then k heads'
    o_proj: torch.Tensor  # [H, heads * hd]
    o_bias: torch.Tensor | None  # [H]
    post_norm: torch.Tensor  # [H]
    gate_up: torch.Tensor  # [2 * I, H]
    gate_up_bias: torch.Tensor | None  # [2 * I]
    down: torch.Tensor  # [H, I]
    down_bias: torch.Tensor | None  # [H]


@dataclass
class ModelWeights:
    embed: torch.Tensor  # [V, H]; under TP the rank's rows [Vr, H] (last shard zero-padded)
    lm_head: torch.Tensor  # [V, H] (the same tensor as `embed` when tied); under TP [Vr, H]
    final_norm: torch.Tensor  # [H]
    layers: list[LayerWeights]
    vocab_start: int = 0  # under TP: the vocabulary id of the shard's first row


def rope_inv_freq(config: ModelArchConfig) -> torch.Tensor:
    """Inverse frequencies `[hd / 2]` (fp32), with llama3/linear scaling as transformers does it."""
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim  # [hd / 2]
    inv_freq = 1.0 / (config.rope_theta**exponents)  # [hd / 2]
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    # llama3: keep high frequencies, divide low ones by `factor`, blend smoothly in between.
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin `[T, 1, hd]` for `apply_rope` (computed in fp32, like transformers)."""
    freqs = positions[:, None].float() * inv_freq[None, :]  # [T, hd / 2]
    cos, sin = freqs.cos(), freqs.sin()  # [T, hd / 2] each
    cos = torch.cat((cos, cos), dim=-1).to(dtype)  # [T, hd]
    sin = torch.cat((-sin, sin), dim=-1).to(dtype)  # [T, hd]
    return cos.unsqueeze(1), sin.unsqueeze(1)  # [T, 1, hd] each


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on `[T, heads, hd]`: x * cos + (x2, x1) * (-sin, sin)."""
    swapped = torch.roll(x, shifts=x.shape[-1] // 2, dims=-1)  # [T, heads, hd] = (x2, x1)
    return torch.addcmul(x * cos, swapped, sin_signed)  # [T, heads, hd]


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim; half precision follows transformers' fp32-then-cast order."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    x32 = x.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return normed if weight is None else weight * normed


class LlamaForCausalLM:
    """Forward over a flat (varlen) token batch; KV lives in the paged cache, one tensor a layer."""

    def __init__(
        self,
        config: ModelArchConfig,
        weights: ModelWeights,
        attention: AttentionBackend | None = None,
        tp: TPGroup | None = None,
    ) -> None:
        """`config` is the rank's local config under TP (worker/distributed.local_config)."""
        self.config = config
        self.tp = tp if tp is not None and tp.size > 1 else None
        self.dtype = weights.embed.dtype
        self.device = weights.embed.device
        self.linear = select_linear(self.device, self.dtype)
        self.weights = self._prepare(weights)
        self.attention = attention or TorchPagedAttention(
            config.num_heads, config.num_kv_heads, config.head_dim
        )
        self.inv_freq = rope_inv_freq(config).to(self.device)  # [hd / 2]
        self.fused = _fused_ops(self.device)

    def _prepare(self, weights: ModelWeights) -> ModelWeights:
        """Matrices in the linear kernel's layout. A packed lm_head is a second copy of a tied
        embedding table (lookups need the plain one): memory traded for ~3% of a decode step."""
        prep = self.linear.prepare
        layers = [
            replace(
                layer,
                qkv=prep(layer.qkv),
                o_proj=prep(layer.o_proj),
                gate_up=prep(layer.gate_up),
                down=prep(layer.down),
            )
            for layer in weights.layers
        ]
        return replace(weights, lm_head=prep(weights.lm_head), layers=layers)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn_metadata: AttentionMetadata,
        kv_caches: list[torch.Tensor],
        layer_done: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """input_ids, positions `[T]` -> final-norm hidden states `[T, H]`.

        `layer_done(i)` is called as soon as layer i has written its KV into `kv_caches[i]`;
        under TP after the layer's first all-reduce, when every rank has written its own.
        """
        cos, sin = rope_cos_sin(self.inv_freq, positions, self.dtype)  # [T, 1, hd] each
        h = self._embed(input_ids)  # [T, H]
        delta = None  # the MLP output not yet added to the residual stream h
        for i, layer in enumerate(self.weights.layers):
            x, h = self._add_norm(h, delta, layer.input_norm)  # [T, H] each
            q, k, v = self._qkv(layer, x, cos, sin)
            self.attention.write_kv(kv_caches[i], k, v, attn_metadata)
            if layer_done is not None and self.tp is None:
                layer_done(i)
            attn_out = self.attention.attend(q, k, v, kv_caches[i], attn_metadata)  # [T, heads*hd]
            o = self._all_reduce(self.linear(attn_out, layer.o_proj, layer.o_bias))  # [T, H]
            if layer_done is not None and self.tp is not None:
                layer_done(i)  # past this all-reduce every rank has written its KV of layer i
            x, h = self._add_norm(h, o, layer.post_norm)  # [T, H] each
            delta = self._mlp(layer, x)  # [T, H]
        return self._add_norm(h, delta, self.weights.final_norm)[0]  # [T, H]

    __call__ = forward

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden `[N, H]` (only rows that sample) -> logits `[N, V]`, on every rank."""
        logits = self.linear(hidden, self.weights.lm_head, None)  # [N, V] or [N, Vr] under TP
        if self.tp is None:
            return logits
        gathered = self.tp.all_gather_rows(logits)  # [N, size * Vr]
        return gathered[:, : self.config.vocab_size]  # [N, V]: the last shard's padding cut

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids `[T]` -> embeddings `[T, H]`; under TP each rank looks up its own rows,
        zero elsewhere, and the sum over ranks is the whole lookup."""
        if self.tp is None:
            return F.embedding(input_ids, self.weights.embed)  # [T, H]
        local = input_ids - self.weights.vocab_start  # [T]
        outside = (local < 0) | (local >= self.weights.embed.shape[0])  # [T]
        h = F.embedding(local.masked_fill(outside, 0), self.weights.embed)  # [T, H]
        return self.tp.all_reduce(h.masked_fill_(outside[:, None], 0))  # [T, H]

    def _all_reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """A row-parallel projection's partial sums `[T, H]` -> the whole projection."""
        return partial if self.tp is None else self.tp.all_reduce(partial)

    def _add_norm(
        self, h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """h + delta (the new residual stream) and its RMSNorm, both `[T, H]`."""
        eps = self.config.rms_norm_eps
        if self.fused is not None:
            return self.fused.add_rms_norm(h, delta, weight, eps)
        if delta is not None:
            h = h + delta
        return rms_norm(h, weight, eps), h

    def _qkv(
        self, layer: LayerWeights, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normed hidden `[T, H]` -> q `[T, heads, hd]`, k and v `[T, kvh, hd]` (q, k rotated)."""
        cfg = self.config
        num_tokens, heads, kv_heads = x.shape[0], cfg.num_heads, cfg.num_kv_heads
        qkv = self.linear(x, layer.qkv, layer.qkv_bias)  # [T, (heads + 2 kvh) * hd]
        qk = qkv[:, : cfg.q_size + cfg.kv_size].view(num_tokens, heads + kv_heads, -1)
        if layer.qk_norm is not None:
            qk = rms_norm(qk, None, cfg.rms_norm_eps) * layer.qk_norm  # [T, heads + kvh, hd]
        if self.fused is not None and _is_pow2(qk.shape[-1]):
            qk = self.fused.rope(qk, cos, sin)  # [T, heads + kvh, hd]
        else:
            qk = apply_rope(qk, cos, sin)  # [T, heads + kvh, hd]
        v = qkv[:, cfg.q_size + cfg.kv_size :].view(num_tokens, kv_heads, -1)  # [T, kvh, hd]
        return qk[:, :heads], qk[:, heads:], v

    def _mlp(self, layer: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.linear(x, layer.gate_up, layer.gate_up_bias)  # [T, 2 * I]
        if self.fused is not None:
            act = self.fused.silu_mul(gate_up)  # [T, I]
        else:
            gate, up = gate_up.chunk(2, dim=-1)  # [T, I] each
            act = F.silu(gate) * up  # [T, I]
        return self._all_reduce(self.linear(act, layer.down, layer.down_bias))  # [T, H]


def _is_pow2(n: int) -> bool:
    return n & (n - 1) == 0


def _fused_ops(device: torch.device):
    """The Triton fused ops on CUDA when Triton is installed; None (plain torch) otherwise."""
    if device.type != "cuda" or importlib.util.find_spec("triton") is None:
        return None
    from worker.models.triton_ops import TritonOps

    return TritonOps()
