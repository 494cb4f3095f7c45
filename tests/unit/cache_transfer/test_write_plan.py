"""Write plans: a request's descriptors planned once and offset per layer must move exactly the
bytes that per-layer descriptor lists did, through the real backends (NIXL, TCP, local)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from cache_transfer.backend import TransferState, deadline_in
from cache_transfer.factory import rank_kv_wire
from cache_transfer.layout import KVLayout, KVRegions, LayoutError
from cache_transfer.shared_kv import SharedKVCache
from cache_transfer.tp_layout import HeadRange, RankKV, head_slice_descs, route_heads
from cache_transfer.write_plan import check_layer, plan_write

LAYERS, BLOCKS, BLOCK_SIZE, HEAD_DIM = 3, 12, 4, 8
PREFIX = f"pdkvt{os.getpid()}wp"


def _fake_ranks(kv_heads: int, size: int, base: int) -> list[RankKV]:
    """Ranks at made-up addresses (planning never touches memory)."""
    per = kv_heads // size
    layout = KVLayout(LAYERS, BLOCKS, BLOCK_SIZE, per, HEAD_DIM, 2)
    stride = layout.layer_nbytes + 4096
    return [
        RankKV(
            KVRegions(layout, tuple(base + (r * LAYERS + i) * stride for i in range(LAYERS))),
            HeadRange(r * per, per),
        )
        for r in range(size)
    ]


@pytest.mark.parametrize(("p_size", "d_size"), [(1, 1), (2, 2), (2, 1), (1, 2), (4, 2)])
@pytest.mark.parametrize("pattern", ["runs", "scattered", "empty"])
def test_a_plans_descs_are_every_routes_descs_of_that_layer(p_size, d_size, pattern):
    p, d = _fake_ranks(4, p_size, 1 << 32), _fake_ranks(4, d_size, 1 << 40)
    routes = route_heads([r.heads for r in p], [r.heads for r in d])
    src_ids, dst_ids = {
        "runs": ([0, 1, 2, 5, 6, 9], [3, 4, 5, 10, 11, 0]),
        "scattered": ([7, 3, 11], [0, 2, 4]),
        "empty": ([], []),
    }[pattern]
    plan = plan_write("d", p, d, routes, src_ids, dst_ids)
    for src_layer, dst_layer in [(0, 0), (1, 2), (2, 1)]:
        want_src, want_dst = [], []
        for route in routes:
            s, t = p[route.src_rank], d[route.dst_rank]
            pair = head_slice_descs(
                s.regions,
                s.heads,
                src_layer,
                src_ids,
                t.regions,
                t.heads,
                dst_layer,
                dst_ids,
                route.heads,
            )
            want_src += pair[0]
            want_dst += pair[1]
        src, dst = plan.descs(src_layer, dst_layer)
        assert src.dtype == dst.dtype == np.int64
        table = plan.columns(src_layer, dst_layer, plan.dst_bases)  # the copy kernel's form
        np.testing.assert_array_equal(table, [src[:, 0], dst[:, 0], src[:, 1]])
        assert [tuple(row) for row in src.tolist()] == want_src
        assert [tuple(row) for row in dst.tolist()] == want_dst
    assert plan.num_descs == len(want_src) and plan.aligned8
    layers = [2, 0, 1]
    src, dst = plan.descs_of_layers(layers)  # several layers in one transfer
    per_layer = [plan.descs(layer, layer) for layer in layers]
    np.testing.assert_array_equal(src, np.concatenate([pair[0] for pair in per_layer]))
    np.testing.assert_array_equal(dst, np.concatenate([pair[1] for pair in per_layer]))
    assert plan.nbytes == sum(n for _, n, _ in want_src)


def test_a_plan_rejects_what_a_write_cannot_take():
    p, d = _fake_ranks(2, 1, 1 << 32), _fake_ranks(2, 1, 1 << 40)
    routes = route_heads([r.heads for r in p], [r.heads for r in d])
    with pytest.raises(LayoutError, match="2 source blocks but 1"):
        plan_write("d", p, d, routes, [0, 1], [2])
    with pytest.raises(LayoutError, match="repeat"):
        plan_write("d", p, d, routes, [0, 1], [2, 2])
    with pytest.raises(LayoutError, match="outside"):
        plan_write("d", p, d, routes, [0, 1], [2, BLOCKS])
    plan = plan_write("d", p, d, routes, [0], [1])
    with pytest.raises(LayoutError, match=r"layer 3 outside 0\.\.2"):
        plan.descs(0, LAYERS)
    with pytest.raises(LayoutError, match="layer -1"):
        check_layer(-1, plan.src_bases)


def _cache(fill: bool) -> SharedKVCache:
    layout = KVLayout(LAYERS, BLOCKS, BLOCK_SIZE, 2, HEAD_DIM, 4)
    cache = SharedKVCache.create(PREFIX, layout, "float32")
    rng = np.random.default_rng()
    for layer in range(LAYERS):
        view = cache.layer_bytes(layer)
        view[:] = rng.integers(0, 256, view.shape, dtype=np.uint8) if fill else 0
    return cache


def _backend(kind: str, name: str, shares: SharedKVCache | None = None):
    from cache_transfer.factory import make_backend

    backend = make_backend(kind, name, "127.0.0.1")
    if shares is not None:
        backend.share(rank_kv_wire([shares.handle()], [(0, 2)]))
    return backend


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["nixl", "tcp", "local"])
def test_one_plan_writes_every_layer_byte_exact(kind):
    """Planned once, written for several layers at once and for one layer after the peer
    reconnected (the stale plan is planned anew), the destination holds exactly the source's
    blocks, nothing else changed."""
    src, dst = _cache(True), _cache(False)
    src_ids, dst_ids = [0, 1, 2, 5, 7, 8], [9, 10, 11, 1, 3, 6]
    try:
        with _backend(kind, "p") as source, _backend(kind, "d", shares=dst) as target:
            source.register(src.regions())
            target.register(dst.regions())
            peer = source.connect(target.endpoint_info(), deadline_in(20))
            plan = source.plan(peer, src_ids, dst_ids)
            assert plan.num_descs == 4  # 0-2 -> 9-11, 5 -> 1, 7 -> 3, 8 -> 6
            handles = source.write_layers(plan, list(range(LAYERS - 1)))  # one transfer...
            assert len(handles) == (LAYERS - 1 if kind == "tcp" else 1)  # ...where it can be
            assert sum(h.nbytes for h in handles) == (LAYERS - 1) * plan.nbytes
            for handle in handles:
                assert source.wait(handle, deadline_in(20)) is TransferState.DONE
                source.release(handle)
            source.connect(target.endpoint_info(), deadline_in(20))  # same peer, reconnected
            handle = source.write_plan(plan, LAYERS - 1, LAYERS - 1)
            assert source.wait(handle, deadline_in(20)) is TransferState.DONE
            source.release(handle)
            assert source.stats()["failed"] == 0
        untouched = [b for b in range(BLOCKS) if b not in dst_ids]
        for layer in range(LAYERS):
            got, want = dst.layer_bytes(layer), src.layer_bytes(layer)
            np.testing.assert_array_equal(got[dst_ids], want[src_ids])
            assert not got[untouched].any()
    finally:
        src.close()
        dst.close()
