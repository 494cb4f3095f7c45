"""Paged attention in Triton (the `AttentionBackend` of worker/attention/__init__.py), for CUDA.

- `write_kv`: one program per new token copies its K and V rows into the cache (slot -1: skip,
  which padding rows of a CUDA-graph batch use).
- decode (one query per sequence): flash-decoding. Each program takes one (sequence, kv head,
  split of the context) and all `g` query heads of that kv head, so each K/V row is read once
  per group; with few sequences the context is split so that the grid still fills the GPU, and
  a second kernel merges the splits by their log-sum-exp. One split writes the output directly.
- prefill (chunks of several tokens, possibly after a cached prefix): one program per (tile of
  64 queries, head), causal (and sliding-window) masking, keys read from the cache.
- prefill of a long chunk with nothing cached before it (`flash_prefill`, on by default for
  bf16/fp16): FlashAttention through torch's scaled_dot_product_attention over the chunk's own
  q/k/v, one call per chunk (about twice the paged kernel's rate on a contiguous chunk). Its K/V
  are written to the cache as every chunk's are.

The number of splits depends only on (sequences, longest context), so a CUDA graph captured for
a batch size with the longest context it allows keeps a fixed grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.batch import ScheduledChunk
from worker.attention.block_tables import BlockTables
from worker.attention.triton_kernels import (
    decode_reduce_kernel,
    decode_split_kernel,
    next_pow2,
    prefill_kernel,
    store_kv_kernel,
)
from worker.attention.triton_metadata import (
    FLASH_MIN_TOKENS,
    PREFILL_BLOCK_M,
    FlashPrefill,
    TritonAttentionMetadata,
    TritonDecode,
    TritonPrefill,
    TritonStepInputs,
    flash_padded_length,
    prepare_triton_inputs,
)

_LOG2E = 1.4426950408889634
# Aim for this many decode programs per SM before splitting contexts further.
_PROGRAMS_PER_SM = 2
# At most this many splits per decode row, and the reduce kernel's split axis is always this
# wide: a width that followed the split count would be a constexpr, so a new kernel variant
# (a compile, mid-serving) for every power of two a batch's split count reaches.
_MAX_SPLITS = 64


@dataclass
class LaunchConfig:
    """Tile width over keys, warps and pipeline stages of one kernel (benchmarks sweep these)."""

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2


class TritonPagedAttention:
    """The Triton backend of the `AttentionBackend` interface."""

    name = "triton"

    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, flash_prefill: bool = False
    ) -> None:
        """`flash_prefill`: attend long chunks without a cached prefix with FlashAttention (an
        attribute read at every step: a benchmark may switch it between runs)."""
        assert num_heads % num_kv_heads == 0
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.group = num_heads // num_kv_heads
        self.qk_scale = _LOG2E / math.sqrt(head_dim)
        self._num_sms: int | None = None
        # Measured on an H100 (benchmarks/gpu_attention.py, Llama-3-8B heads, bf16): decode at
        # batch 128 reads K/V at ~80% of the copy rate with 64/4/2 (32- and 128-key tiles and
        # other warp counts within a few %); a 4k prefill runs 211 TFLOP/s with 32-key tiles and
        # 4 warps, 109 with 64 keys and 8 warps.
        self.decode_config = LaunchConfig(block_n=64, num_warps=4, num_stages=2)
        self.prefill_config = LaunchConfig(block_n=32, num_warps=4, num_stages=2)
        self.flash_prefill = flash_prefill
        self.flash_min_tokens = FLASH_MIN_TOKENS  # tests lower it to cover short chunks

    def prepare_inputs(
        self,
        chunks: list[ScheduledChunk],
        block_size: int,
        device: torch.device,
        sliding_window: int | None,
        block_tables: BlockTables | None = None,
    ) -> TritonStepInputs:
        flash_min = self.flash_min_tokens if self.flash_prefill else None
        return prepare_triton_inputs(
            chunks, block_size, device, sliding_window, block_tables, flash_min
        )

    def write_kv(
        self,
        kv_layer: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: TritonAttentionMetadata,
    ) -> None:
        """k, v `[T, kvh, hd]` (each row contiguous) -> their slots of `kv_layer`."""
        row = self.num_kv_heads * self.head_dim
        assert k.stride(1) == v.stride(1) == self.head_dim and k.stride(2) == v.stride(2) == 1
        num_tokens = k.shape[0]
        store_kv_kernel[(num_tokens,)](
            k, v, kv_layer, meta.slots, k.stride(0), v.stride(0),
            BS=meta.block_size, ROW=row, BLOCK=next_pow2(row),
        )  # fmt: skip

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_layer: torch.Tensor,
        meta: TritonAttentionMetadata,
    ) -> torch.Tensor:
        """q `[T, heads, hd]` (rows may be strided) -> `[T, heads * hd]`; K/V read from cache
        (fresh k/v `[T, kvh, hd]` are read only by the FlashAttention chunks)."""
        assert q.stride(2) == 1
        if meta.decode is None and meta.prefill is None and len(meta.flash) == 1:
            return self._flash(q, k, v)  # one fresh prompt: its output is the whole step's
        out = q.new_empty(meta.num_tokens, self.num_heads * self.head_dim)  # [T, heads * hd]
        if meta.decode is not None:
            self._decode(q, kv_layer, meta, meta.decode, out)
        if meta.prefill is not None:
            self._prefill(q, kv_layer, meta, meta.prefill, out)
        for chunk in meta.flash:
            rows = _rows(chunk)
            out[rows] = self._flash(q[rows], k[rows], v[rows])
        return out

    def decode_splits(self, num_seqs: int, max_len: int) -> tuple[int, int]:
        """(number of splits, keys per split) for a decode batch; a pure function of its args."""
        if self._num_sms is None:
            # Without CUDA (Triton's interpreter in tests) any small count will do.
            cuda = torch.cuda.is_available()
            props = torch.cuda.get_device_properties(torch.cuda.current_device()) if cuda else None
            self._num_sms = props.multi_processor_count if props else 4
        programs = max(1, num_seqs * self.num_kv_heads)
        block_n = self.decode_config.block_n
        want = max(1, -(-_PROGRAMS_PER_SM * self._num_sms // programs))
        splits = max(1, min(want, _MAX_SPLITS, -(-max_len // block_n)))
        partition = -(-max_len // splits)
        partition = -(-partition // block_n) * block_n
        return -(-max_len // partition), partition

    def _decode(
        self,
        q: torch.Tensor,
        kv_layer: torch.Tensor,
        meta: TritonAttentionMetadata,
        dec: TritonDecode,
        out: torch.Tensor,
    ) -> None:
        heads, hd, cfg = self.num_heads, self.head_dim, self.decode_config
        splits, partition = self.decode_splits(dec.num_seqs, dec.max_len)
        direct = splits == 1
        if direct:  # unused by the kernel: any tensors will do
            part_out, part_lse = out, out
        else:
            part_out = torch.empty(dec.num_seqs, heads, splits, hd, device=q.device)
            part_lse = torch.empty(dec.num_seqs, heads, splits, device=q.device)
        window = meta.sliding_window or 0
        grid = (dec.num_seqs, self.num_kv_heads, splits)
        decode_split_kernel[grid](
            q, kv_layer, out, part_out, part_lse, dec.rows, dec.tables, dec.lens,
            q.stride(0), q.stride(1), out.stride(0), dec.tables.stride(0),
            kv_layer.stride(0), kv_layer.stride(2), partition, window, self.qk_scale,
            NUM_HEADS=heads, G=self.group,
            BLOCK_G=max(16, next_pow2(self.group)), HD=hd, BLOCK_D=max(16, next_pow2(hd)),
            BS=meta.block_size, BLOCK_N=cfg.block_n, USE_WINDOW=window > 0,
            DIRECT=direct, PRECISION=_precision(q), num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )  # fmt: skip
        if not direct:
            decode_reduce_kernel[(dec.num_seqs, heads)](
                out, part_out, part_lse, dec.rows, out.stride(0), splits,
                NUM_HEADS=heads, BLOCK_S=_MAX_SPLITS,
                HD=hd, BLOCK_D=next_pow2(hd), num_warps=4,
            )  # fmt: skip

    def _prefill(
        self,
        q: torch.Tensor,
        kv_layer: torch.Tensor,
        meta: TritonAttentionMetadata,
        pre: TritonPrefill,
        out: torch.Tensor,
    ) -> None:
        hd, cfg = self.head_dim, self.prefill_config
        window = meta.sliding_window or 0
        prefill_kernel[(pre.num_tiles, self.num_heads)](
            q, kv_layer, out, pre.tile_seq, pre.tile_start, pre.q_starts, pre.q_lens, pre.ctx,
            pre.tables, q.stride(0), q.stride(1), out.stride(0), pre.tables.stride(0),
            kv_layer.stride(0), kv_layer.stride(2), window, self.qk_scale,
            G=self.group, HD=hd, BLOCK_D=max(16, next_pow2(hd)), BS=meta.block_size,
            BLOCK_M=PREFILL_BLOCK_M, BLOCK_N=cfg.block_n, USE_WINDOW=window > 0,
            PRECISION=_precision(q), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip

    def _flash(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of one chunk over itself: q `[n, heads, hd]`, k/v `[n, kvh, hd]`
        (strided rows, contiguous heads) -> `[n, heads * hd]`. Padded to FLASH_BUCKET rows (see
        there); for bf16/fp16 SDPA picks cuDNN's attention or FlashAttention, both of which
        read the kv heads as they are (no expansion to `heads`)."""
        n = q.shape[0]
        padded = flash_padded_length(n)

        def heads_first(x: torch.Tensor) -> torch.Tensor:  # [n, h, hd] -> [1, h, padded, hd]
            # Token-major in memory, as the model's q/k/v views are (SDPA's fast layout), and
            # always a copy: every chunk of a bucket then has the same strides, i.e. one plan.
            buffer = x.new_empty(padded, *x.shape[1:])
            buffer[:n] = x
            buffer[n:].zero_()  # padded keys must be finite, though no real query sees them
            return buffer.transpose(0, 1).unsqueeze(0)

        o = F.scaled_dot_product_attention(
            heads_first(q),
            heads_first(k),
            heads_first(v),
            is_causal=True,
            enable_gqa=self.group > 1,
        )  # [1, heads, padded, hd]
        return o[0, :, :n].transpose(0, 1).reshape(n, -1)  # [n, heads * hd]


def _rows(chunk: FlashPrefill) -> slice:
    return slice(chunk.token_start, chunk.token_start + chunk.num_tokens)


def _precision(q: torch.Tensor) -> str:
    """fp32 models get exact fp32 products (the tests compare tokens with transformers)."""
    return "ieee" if q.dtype == torch.float32 else "tf32"
