"""Staged writes between tensor-parallel sizes (cache_transfer/staging.py): over real NIXL and
TCP, each decode rank ends up with exactly its heads at its blocks, through a staging ring small
enough that writes split into pieces and wait for space; equal sizes stay direct."""

from __future__ import annotations

import pytest
import torch

from cache_transfer.backend import TransferState, deadline_in
from cache_transfer.layout import LayoutError
from cache_transfer.staging import StagedWriter
from cache_transfer.staging_ring import StagingRing
from cache_transfer.tp_layout import RankKV
from cache_transfer.write_plan import WritePlan
from tests.unit.cache_transfer.test_tp_layout import (
    BLOCK_SIZE,
    HEAD_DIM,
    LAYERS,
    _backend,
    _caches,
    _ranks,
    _regions,
)

KV_HEADS = 4
BLOCK_BYTES = 2 * BLOCK_SIZE * KV_HEADS * HEAD_DIM * 4  # one block, every head, fp32


def test_ring_hands_space_back_in_order_and_wraps():
    ring = StagingRing(1024)
    a, b = ring.alloc(512), ring.alloc(256)
    assert (a.offset, b.offset) == (0, 512)
    assert ring.alloc(512) is None  # 256 free at the end, the front held by a
    b.done = True
    assert ring.alloc(512) is None  # b finished, but a (older) still holds the front
    a.done = True
    c = ring.alloc(512)
    assert c is not None and c.offset == 0  # both returned: starts over
    d = ring.alloc(256)
    c.done = True
    e = ring.alloc(384)  # past d to the end is 256: wraps to the front c gave back
    assert (d.offset, e.offset) == (512, 0)
    assert ring.alloc(256) is None  # wrapped: only [384, 512) is free
    with pytest.raises(ValueError):
        ring.alloc(2048)


def _pair(kind, p_size, d_size, capacity):
    whole = torch.randn(LAYERS, 6, 2, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    p_heads, d_heads = _ranks(KV_HEADS, p_size), _ranks(KV_HEADS, d_size)
    p_caches, d_caches = _caches(p_heads, whole), _caches(d_heads, None)
    p_ranks = [RankKV(_regions(c), h) for c, h in zip(p_caches, p_heads, strict=True)]
    d_ranks = [RankKV(_regions(c), h) for c, h in zip(d_caches, d_heads, strict=True)]
    source, target = (
        _backend(kind, f"p-st{p_size}{d_size}"),
        _backend(kind, f"d-st{p_size}{d_size}"),
    )
    source.register(p_ranks)
    target.register(d_ranks)
    writer = StagedWriter(source, p_caches, capacity)
    return whole, d_heads, d_caches, writer, target


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["tcp", "nixl"])
@pytest.mark.parametrize(
    ("p_size", "d_size", "capacity"),
    [(2, 1, 2 * BLOCK_BYTES), (1, 2, 1 << 20), (4, 1, 3 * BLOCK_BYTES), (2, 4, 2 * BLOCK_BYTES)],
)
def test_staged_writes_move_each_ranks_heads(kind, p_size, d_size, capacity):
    """Every layer's write issued before any is waited on: with a ring of two or three blocks a
    write goes out one block at a time and later pieces queue until earlier ones finish."""
    whole, d_heads, d_caches, writer, target = _pair(kind, p_size, d_size, capacity)
    src_ids, dst_ids = [0, 1, 2, 4], [5, 1, 2, 3]
    try:
        peer = writer.connect(target.endpoint_info(), deadline_in(10))
        plan = writer.plan(peer, src_ids, dst_ids)  # the messager's path: planned once per chunk
        handles = [
            writer.write_plan(plan, layer, layer)
            if layer % 2
            else writer.write(peer, layer, src_ids, layer, dst_ids)
            for layer in range(LAYERS)
        ]
        for handle in handles:
            assert writer.wait(handle, deadline_in(10)) is TransferState.DONE
            assert handle.nbytes == len(src_ids) * BLOCK_BYTES
            writer.release(handle)
        stats = writer.stats()
        assert stats["staged_writes"] == LAYERS and stats["staging_bytes"] == capacity
        if capacity < 4 * BLOCK_BYTES:
            assert stats["staged_pieces"] == LAYERS * len(src_ids)  # one block per piece
        else:  # one piece per layer: one run per destination run of each D rank
            assert handles[0].num_descs == d_size * 2  # [5], [1, 2, 3]
    finally:
        writer.close()
        target.close()
    for rank, h in enumerate(d_heads):
        for layer in range(LAYERS):
            want = whole[layer][src_ids][:, :, :, h.start : h.end]
            torch.testing.assert_close(d_caches[rank][layer][dst_ids], want, rtol=0, atol=0)
            untouched = [b for b in range(6) if b not in dst_ids]
            assert d_caches[rank][layer][untouched].abs().sum() == 0


@pytest.mark.timeout(60)
def test_equal_sizes_write_directly_and_bad_ids_fail_before_sending():
    whole, _, d_caches, writer, target = _pair("tcp", 2, 2, 1 << 20)
    try:
        peer = writer.connect(target.endpoint_info(), deadline_in(10))
        plan = writer.plan(peer, [1, 2], [3, 4])
        assert isinstance(plan, WritePlan)  # the backend's own: no staged rank
        handle = writer.write_plan(plan, 0, 0)
        assert handle.num_descs == 2  # one run per rank, as without staging
        assert writer.wait(handle, deadline_in(10)) is TransferState.DONE
        writer.release(handle)
        assert writer.stats()["staging_bytes"] == 0  # never allocated
        torch.testing.assert_close(d_caches[1][0][[3, 4]], whole[0][[1, 2]][:, :, :, 2:4])
    finally:
        writer.close()
        target.close()
    _, _, _, writer, target = _pair("tcp", 2, 1, 1 << 20)
    try:
        peer = writer.connect(target.endpoint_info(), deadline_in(10))
        with pytest.raises(LayoutError):
            writer.write(peer, 0, [0, 1], 0, [2, 6])  # block 6 of 6
        with pytest.raises(LayoutError):
            writer.write(peer, 0, [0, 1], 0, [2, 2])
        with pytest.raises(LayoutError):
            writer.plan(peer, [0, 1], [2, 6])
        assert writer.stats()["staged_writes"] == 0 and writer.stats()["staging_bytes"] == 0
    finally:
        writer.close()
        target.close()


@pytest.mark.timeout(60)
def test_a_lost_peer_fails_queued_and_posted_pieces_and_frees_the_ring():
    _, _, _, writer, target = _pair("tcp", 2, 1, 2 * BLOCK_BYTES)
    try:
        peer = writer.connect(target.endpoint_info(), deadline_in(10))
        handles = []
        while not writer._queue and len(handles) < 50:  # until a piece waits for the ring
            handles.append(writer.write(peer, len(handles) % LAYERS, [0, 1, 2], 0, [3, 4, 5]))
        assert writer._queue and writer.stats()["staging_waits"] >= 1
        writer.disconnect(peer)
        states = [writer.wait(handle, deadline_in(10)) for handle in handles]
        assert states[-1] is TransferState.FAILED  # its queued piece can no longer go
        for handle in handles:
            writer.release(handle)
        assert writer._ring.alloc(BLOCK_BYTES) is not None  # every slot came back
    finally:
        writer.close()
        target.close()
    assert writer._buffer is None  # freed at close, after the backend
