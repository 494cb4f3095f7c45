"""Paged attention in plain torch, correct on CPU and CUDA.

Single-token chunks (decode) run as one batched computation: their block tables are gathered to
padded K/V `[D, L, kvh, hd]` (whole blocks, so each copy is a contiguous run) and attended under a
mask. Each chunk of several tokens (prefill) is attended on its own: from its fresh K/V when the
chunk is the whole context, otherwise from its blocks in the cache.

GQA without copies: the `g = heads / kv_heads` query heads that share a kv head are consecutive,
so a decode query `[D, heads, hd]` is viewed as `[D, kvh, g, hd]`, i.e. g query rows per kv head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from worker.attention.metadata import AttentionMetadata, DecodeGroup, PrefillSeq


class TorchPagedAttention:
    """The torch backend of the `AttentionBackend` interface (see worker/attention/__init__.py)."""

    name = "torch"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim

    def write_kv(
        self, kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> None:
        """Store the new tokens' K/V `[T, kvh, hd]` at their slots of `kv_layer`."""
        rows = kv_layer.view(-1, self.num_kv_heads, self.head_dim)  # [nb * 2 * bs, kvh, hd]
        rows.index_copy_(0, meta.k_rows, k)
        rows.index_copy_(0, meta.v_rows, v)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_layer: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """q `[T, heads, hd]`, fresh k/v `[T, kvh, hd]` (already written) -> `[T, heads * hd]`."""
        decode, prefills = meta.decode, meta.prefills
        if decode is not None and not prefills and decode.token_index is None:
            return self._attend_decode(q, kv_layer, decode, meta.block_size)
        out = q.new_empty(meta.num_tokens, self.num_heads * self.head_dim)  # [T, heads * hd]
        if decode is not None:
            q_dec = q if decode.token_index is None else q.index_select(0, decode.token_index)
            o_dec = self._attend_decode(q_dec, kv_layer, decode, meta.block_size)
            if decode.token_index is None:
                out[: decode.num_seqs] = o_dec
            else:
                out.index_copy_(0, decode.token_index, o_dec)
        for seq in prefills:
            rows = slice(seq.token_start, seq.token_start + seq.num_tokens)
            out[rows] = self._attend_prefill(q[rows], k[rows], v[rows], kv_layer, seq)
        return out

    def _attend_decode(
        self, q: torch.Tensor, kv_layer: torch.Tensor, group: DecodeGroup, block_size: int
    ) -> torch.Tensor:
        d, kvh, hd = group.num_seqs, self.num_kv_heads, self.head_dim
        q = q[:d].view(d, kvh, self.num_heads // kvh, hd)  # [D, kvh, g, hd]
        k, v = self._gather(kv_layer, group.block_ids)  # [D * MB * bs, kvh, hd] each
        k = k.view(d, -1, kvh, hd).transpose(1, 2)  # [D, kvh, L, hd]
        v = v.view(d, -1, kvh, hd).transpose(1, 2)  # [D, kvh, L, hd]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=group.mask)  # [D, kvh, g, hd]
        return o.reshape(d, self.num_heads * hd)  # [D, heads * hd]

    def _attend_prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_layer: torch.Tensor,
        seq: PrefillSeq,
    ) -> torch.Tensor:
        if seq.block_ids is not None:
            k, v = self._gather(kv_layer, seq.block_ids)  # [nblk * bs, kvh, hd] each
            k, v = k[: seq.end_pos], v[: seq.end_pos]  # [S, kvh, hd]
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),  # [1, heads, n, hd]
            k.transpose(0, 1).unsqueeze(0),  # [1, kvh, S, hd]
            v.transpose(0, 1).unsqueeze(0),  # [1, kvh, S, hd]
            attn_mask=seq.mask,
            is_causal=seq.mask is None,
            enable_gqa=True,
        )  # [1, heads, n, hd]
        return o[0].transpose(0, 1).reshape(seq.num_tokens, -1)  # [n, heads * hd]

    def _gather(
        self, kv_layer: torch.Tensor, block_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of whole blocks, each `[len(block_ids) * bs, kvh, hd]` (contiguous copies)."""
        blocks = kv_layer.view(kv_layer.shape[0], 2, -1)  # [nb, 2, bs * kvh * hd]
        k = blocks[:, 0].index_select(0, block_ids)  # [nblk, bs * kvh * hd]
        v = blocks[:, 1].index_select(0, block_ids)  # [nblk, bs * kvh * hd]
        shape = (-1, self.num_kv_heads, self.head_dim)
        return k.view(shape), v.view(shape)
