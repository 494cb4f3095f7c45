"""Triton kernels of the paged attention backend (see triton_paged.py for the launches).

Cache layout, per layer: `[num_blocks, 2, BS, kvh, hd]`; in elements, token `n` of a sequence
has its K at `table[n // BS] * stride_blk + (n % BS) * stride_tok + kv_head * HD` and its V
`BS * stride_tok` further. Key tiles are gathered row by row through the block table, so a tile
may span several cache blocks (each row is `hd` contiguous elements: one coalesced load).

Softmax runs in the log2 domain (`qk_scale` already holds log2(e) / sqrt(hd)), with the running
maximum clamped to 0 while a row has seen no key, so fully masked rows never make 0 * inf.
The kernels are longer than the project's 50-line guideline: splitting a Triton kernel into
helpers would only move the same lines into `@triton.jit` functions with long argument lists.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Integer arguments that change from step to step (block-table width, decode split size and
# count). Triton would otherwise compile a variant per value class (== 1, divisible by 16,
# neither) -- while serving, the first time a batch hits each one. Pointer arguments need no
# such list: the metadata packer keeps every piece 16-byte aligned (packing.py).
_PER_STEP_INTS = ["stride_table", "partition", "num_splits"]


@triton.jit
def store_kv_kernel(
    k_ptr,  # [T, kvh, hd], rows `stride_kt` apart, each row contiguous
    v_ptr,  # [T, kvh, hd], rows `stride_vt` apart
    kv_ptr,  # one layer of the cache, viewed as rows of kvh * hd
    slots_ptr,  # [T] cache row of each token's K; its V is BS rows later; < 0: skip (padding)
    stride_kt,
    stride_vt,
    BS: tl.constexpr,
    ROW: tl.constexpr,  # kvh * hd
    BLOCK: tl.constexpr,  # next power of two >= ROW
):
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t)
    if slot >= 0:
        offs = tl.arange(0, BLOCK)
        mask = offs < ROW
        k = tl.load(k_ptr + t * stride_kt + offs, mask=mask)
        v = tl.load(v_ptr + t * stride_vt + offs, mask=mask)
        tl.store(kv_ptr + slot * ROW + offs, k, mask=mask)
        tl.store(kv_ptr + (slot + BS) * ROW + offs, v, mask=mask)


@triton.jit(do_not_specialize=_PER_STEP_INTS)
def decode_split_kernel(
    q_ptr,  # [T, heads, hd]
    kv_ptr,  # one cache layer
    out_ptr,  # [T, heads * hd]: written directly when DIRECT (one split)
    part_out_ptr,  # [D, heads, splits, HD] fp32, normalized per split (splits: grid axis 2)
    part_lse_ptr,  # [D, heads, splits] fp32, log2-sum-exp of each split (-inf: empty)
    rows_ptr,  # [D] row of each decode query in the flat batch
    tables_ptr,  # [D, >= cdiv(len, BS)] block tables
    lens_ptr,  # [D] keys to attend: positions 0 .. len - 1 (0 for a padding row)
    stride_qt,
    stride_qh,
    stride_ot,
    stride_table,
    stride_blk,
    stride_tok,
    partition,  # keys per split
    window,  # sliding window (used only when USE_WINDOW)
    qk_scale,
    NUM_HEADS: tl.constexpr,
    G: tl.constexpr,  # query heads per kv head
    BLOCK_G: tl.constexpr,  # >= max(G, 16): tl.dot needs 16 rows
    HD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    DIRECT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(lens_ptr + seq)
    lo = split * partition
    hi = tl.minimum(lo + partition, seq_len)
    if USE_WINDOW:
        lo = tl.maximum(lo, seq_len - window)
    row = tl.load(rows_ptr + seq)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    dmask = d < HD
    heads = kvh * G + g  # [BG]
    q_mask = (g < G)[:, None] & dmask[None, :]
    q = tl.load(
        q_ptr + row * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=q_mask, other=0.0
    )  # [BG, BD]
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    table = tables_ptr + seq * stride_table
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)  # [BN] key positions
        nmask = n < hi
        page = tl.load(table + n // BS, mask=nmask, other=0)
        base = page * stride_blk + (n % BS) * stride_tok + kvh * HD  # [BN]
        kv_mask = nmask[:, None] & dmask[None, :]
        k = tl.load(kv_ptr + base[:, None] + d[None, :], mask=kv_mask, other=0.0)  # [BN, BD]
        v = tl.load(kv_ptr + base[:, None] + BS * stride_tok + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BG, BN]
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])  # [BG, BN]
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    has_keys = l_i > 0
    o = acc / tl.where(has_keys, l_i, 1.0)[:, None]  # [BG, BD]
    if DIRECT:
        o_ptrs = out_ptr + row * stride_ot + heads[:, None] * HD + d[None, :]
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=q_mask)
    else:
        part = (seq * NUM_HEADS + heads) * tl.num_programs(2) + split  # [BG]
        tl.store(part_out_ptr + part[:, None] * HD + d[None, :], o, mask=q_mask)
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + part, lse, mask=g < G)


@triton.jit(do_not_specialize=_PER_STEP_INTS)
def decode_reduce_kernel(
    out_ptr,  # [T, heads * hd]
    part_out_ptr,  # [D, heads, splits, HD] fp32
    part_lse_ptr,  # [D, heads, splits] fp32
    rows_ptr,  # [D]
    stride_ot,
    num_splits,
    NUM_HEADS: tl.constexpr,
    BLOCK_S: tl.constexpr,  # >= num_splits
    HD: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    base = (seq * NUM_HEADS + head) * num_splits
    lse = tl.load(part_lse_ptr + base + s, mask=s < num_splits, other=float("-inf"))  # [BS]
    valid = lse > float("-inf")
    m = tl.max(lse, 0)
    w = tl.where(valid, tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m)), 0.0)  # [BS]
    o_mask = valid[:, None] & (d < HD)[None, :]
    o = tl.load(part_out_ptr + (base + s)[:, None] * HD + d[None, :], mask=o_mask, other=0.0)
    total = tl.sum(w, 0)
    res = tl.sum(o * w[:, None], 0) / tl.where(total > 0, total, 1.0)  # [BD]
    row = tl.load(rows_ptr + seq)
    out = out_ptr + row * stride_ot + head * HD + d
    tl.store(out, res.to(out_ptr.dtype.element_ty), mask=d < HD)


@triton.jit(do_not_specialize=_PER_STEP_INTS)
def prefill_kernel(
    q_ptr,  # [T, heads, hd]
    kv_ptr,  # one cache layer (the chunk's own K/V are already written)
    out_ptr,  # [T, heads * hd]
    tile_seq_ptr,  # [NT] prefill sequence of each query tile
    tile_start_ptr,  # [NT] first query of the tile, relative to its sequence's chunk
    q_starts_ptr,  # [P] first row of each chunk in the flat batch
    q_lens_ptr,  # [P] tokens in each chunk
    ctx_ptr,  # [P] position of each chunk's first token (the cached prefix before it)
    tables_ptr,  # [P, >= cdiv(ctx + q_len, BS)]
    stride_qt,
    stride_qh,
    stride_ot,
    stride_table,
    stride_blk,
    stride_tok,
    window,
    qk_scale,
    G: tl.constexpr,
    HD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    kvh = head // G
    seq = tl.load(tile_seq_ptr + tile)
    m0 = tl.load(tile_start_ptr + tile)
    q_start = tl.load(q_starts_ptr + seq)
    q_len = tl.load(q_lens_ptr + seq)
    ctx = tl.load(ctx_ptr + seq)
    m = m0 + tl.arange(0, BLOCK_M)  # [BM] query index within the chunk
    mmask = m < q_len
    q_pos = ctx + m  # [BM]
    d = tl.arange(0, BLOCK_D)
    dmask = d < HD
    q_mask = mmask[:, None] & dmask[None, :]
    q_rows = (q_start + m)[:, None]
    q = tl.load(q_ptr + q_rows * stride_qt + head * stride_qh + d[None, :], mask=q_mask, other=0.0)
    hi = tl.minimum(ctx + q_len, ctx + m0 + BLOCK_M)  # one past the tile's last query position
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(ctx + m0 - window + 1, 0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table = tables_ptr + seq * stride_table
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)  # [BN]
        nmask = n < hi
        page = tl.load(table + n // BS, mask=nmask, other=0)
        base = page * stride_blk + (n % BS) * stride_tok + kvh * HD  # [BN]
        kv_mask = nmask[:, None] & dmask[None, :]
        k = tl.load(kv_ptr + base[:, None] + d[None, :], mask=kv_mask, other=0.0)  # [BN, BD]
        v = tl.load(kv_ptr + base[:, None] + BS * stride_tok + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BM, BN]
        keep = nmask[None, :] & (n[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            keep = keep & (n[None, :] > q_pos[:, None] - window)
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])  # [BM, BN]
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = out_ptr + q_rows * stride_ot + head * HD + d[None, :]
    tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=q_mask)


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(n)
