"""KV transfer between tensor-parallel sizes: copying the descriptors' bytes from every P rank's
cache into every D rank's gives each D rank exactly the heads it holds, at its blocks."""

from __future__ import annotations

import ctypes

import pytest
import torch

from cache_transfer.backend import TransferState, deadline_in
from cache_transfer.layout import KVLayout, KVRegions, LayoutError
from cache_transfer.tp_layout import (
    HeadRange,
    HeadRoute,
    RankKV,
    check_ranks,
    head_slice_descs,
    plan_routes,
    route_heads,
)
from worker.distributed import shard_layout
from worker.model_config import parse_model_config

LAYERS, BLOCKS, BLOCK_SIZE, HEAD_DIM = 2, 6, 4, 8


def _config(kv_heads: int):
    return parse_model_config(
        dict(
            architectures=["LlamaForCausalLM"],
            vocab_size=64,
            hidden_size=64,
            intermediate_size=64,
            num_hidden_layers=LAYERS,
            num_attention_heads=8,
            num_key_value_heads=kv_heads,
            head_dim=HEAD_DIM,
        )
    )


def _ranks(kv_heads: int, size: int) -> list[HeadRange]:
    config = _config(kv_heads)
    layouts = [shard_layout(config, r, size) for r in range(size)]
    return [HeadRange(s.kv_head_start, s.kv_heads) for s in layouts]


def _caches(heads: list[HeadRange], whole: torch.Tensor | None) -> list[list[torch.Tensor]]:
    """Per rank, per layer `[blocks, 2, block_size, rank_heads, hd]`: slices of `whole` (a
    `[layers, blocks, 2, block_size, heads, hd]` tensor) or zeros."""
    caches = []
    for h in heads:
        if whole is None:
            shape = (BLOCKS, 2, BLOCK_SIZE, h.count, HEAD_DIM)
            caches.append([torch.zeros(shape) for _ in range(LAYERS)])
        else:
            caches.append([whole[i, :, :, :, h.start : h.end].contiguous() for i in range(LAYERS)])
    return caches


def _regions(layers: list[torch.Tensor]) -> KVRegions:
    layout = KVLayout(LAYERS, BLOCKS, BLOCK_SIZE, layers[0].shape[3], HEAD_DIM, 4)
    return KVRegions(layout, tuple(t.data_ptr() for t in layers))


@pytest.mark.parametrize(
    ("kv_heads", "p_size", "d_size"),
    [(4, 2, 1), (4, 1, 2), (4, 2, 4), (4, 4, 2), (4, 2, 2), (2, 1, 4), (2, 4, 1), (1, 2, 4)],
)
def test_every_decode_rank_gets_its_heads(kv_heads, p_size, d_size):
    whole = torch.randn(LAYERS, BLOCKS, 2, BLOCK_SIZE, kv_heads, HEAD_DIM)
    p_heads, d_heads = _ranks(kv_heads, p_size), _ranks(kv_heads, d_size)
    p_caches, d_caches = _caches(p_heads, whole), _caches(d_heads, None)
    src_ids, dst_ids = [0, 1, 2, 4], [5, 1, 2, 3]
    routes = route_heads(p_heads, d_heads)
    for route in routes:
        src, dst = p_caches[route.src_rank], d_caches[route.dst_rank]
        for layer in range(LAYERS):
            src_descs, dst_descs = head_slice_descs(
                _regions(src),
                p_heads[route.src_rank],
                layer,
                src_ids,
                _regions(dst),
                d_heads[route.dst_rank],
                layer,
                dst_ids,
                route.heads,
            )
            for (s_addr, n, _), (d_addr, m, _) in zip(src_descs, dst_descs, strict=True):
                assert n == m
                ctypes.memmove(d_addr, s_addr, n)
    for rank, h in enumerate(d_heads):
        for layer in range(LAYERS):
            got = d_caches[rank][layer][dst_ids]
            want = whole[layer][src_ids][:, :, :, h.start : h.end]
            torch.testing.assert_close(got, want, rtol=0, atol=0)
            untouched = [b for b in range(BLOCKS) if b not in dst_ids]
            assert d_caches[rank][layer][untouched].abs().sum() == 0
    if p_size == d_size:  # equal sizes: rank r to rank r, whole blocks
        assert routes == [HeadRoute(r, r, p_heads[r]) for r in range(p_size)]


def test_equal_heads_merge_blocks_into_runs():
    heads = HeadRange(0, 2)
    layers = [torch.zeros(BLOCKS, 2, BLOCK_SIZE, 2, HEAD_DIM) for _ in range(LAYERS)]
    src_descs, _ = head_slice_descs(
        _regions(layers), heads, 0, [1, 2, 3], _regions(layers), heads, 1, [3, 4, 5], heads
    )
    assert len(src_descs) == 1  # one run of three blocks


def test_a_head_no_prefill_rank_holds_is_an_error():
    with pytest.raises(LayoutError, match="KV head 2"):
        route_heads([HeadRange(0, 2)], [HeadRange(0, 2), HeadRange(2, 2)])


def _backend(kind: str, name: str):
    if kind == "tcp":
        from cache_transfer.tcp_backend import TcpBackend

        return TcpBackend(name, host="127.0.0.1")
    from cache_transfer.nixl_backend import NixlBackend

    return NixlBackend(name)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["tcp", "nixl"])
@pytest.mark.parametrize(("p_size", "d_size"), [(2, 1), (1, 2)])
def test_backends_move_each_ranks_heads(kind, p_size, d_size):
    """A real NIXL (or TCP) write between instances of different sizes: one write per layer
    carries every route, and each D rank ends up with exactly its heads."""
    whole = torch.randn(LAYERS, BLOCKS, 2, BLOCK_SIZE, 4, HEAD_DIM)
    p_heads, d_heads = _ranks(4, p_size), _ranks(4, d_size)
    p_caches, d_caches = _caches(p_heads, whole), _caches(d_heads, None)
    src_ids, dst_ids = [0, 1, 2, 4], [5, 1, 2, 3]
    p_ranks = [RankKV(_regions(c), h) for c, h in zip(p_caches, p_heads, strict=True)]
    d_ranks = [RankKV(_regions(c), h) for c, h in zip(d_caches, d_heads, strict=True)]
    with _backend(kind, "p-tp") as source, _backend(kind, "d-tp") as target:
        source.register(p_ranks)
        target.register(d_ranks)
        peer = source.connect(target.endpoint_info(), deadline_in(10))
        for layer in range(LAYERS):
            handle = source.write(peer, layer, src_ids, layer, dst_ids)
            assert source.wait(handle, deadline_in(10)) is TransferState.DONE
            source.release(handle)
    for rank, h in enumerate(d_heads):
        for layer in range(LAYERS):
            want = whole[layer][src_ids][:, :, :, h.start : h.end]
            torch.testing.assert_close(d_caches[rank][layer][dst_ids], want, rtol=0, atol=0)


def test_caches_of_different_models_do_not_pair():
    a = torch.zeros(BLOCKS, 2, BLOCK_SIZE, 2, HEAD_DIM)
    src = [RankKV(_regions([a] * LAYERS), HeadRange(0, 2))]
    dst = [RankKV(_regions([a] * LAYERS), HeadRange(2, 2))]
    with pytest.raises(LayoutError, match="KV head 2"):
        plan_routes(src, dst)
    with pytest.raises(LayoutError, match="do not match"):
        check_ranks([RankKV(_regions([a] * LAYERS), HeadRange(0, 3))])
