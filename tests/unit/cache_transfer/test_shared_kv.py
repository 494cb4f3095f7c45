"""Shared-memory KV caches: another process maps the same bytes, and nothing leaks in /dev/shm."""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import pytest

from cache_transfer.layout import KVLayout
from cache_transfer.shared_kv import SharedKVCache, SharedKVError

pytestmark = pytest.mark.timeout(30)

LAYOUT = KVLayout(num_layers=3, num_blocks=6, block_size=4, kv_heads=2, head_dim=8, itemsize=4)
PREFIX = f"pdkvt{os.getpid()}sk"


def _leftovers() -> list[str]:
    return [name for name in os.listdir("/dev/shm") if name.startswith(PREFIX)]


@pytest.fixture(autouse=True)
def no_shm_leaks() -> Iterator[None]:
    yield
    assert _leftovers() == []


def _child_attach(handle: dict[str, Any], conn: Connection) -> None:
    cache = SharedKVCache.attach(handle)
    try:
        # Report what the owner wrote, then write a pattern the owner must see.
        conn.send(bytes(cache.layer_bytes(2)[1]))
        cache.layer_bytes(0)[5] = 7
    finally:
        cache.close()
    conn.send("done")


def test_attach_from_another_process_sees_writes_both_ways() -> None:
    owner = SharedKVCache.create(PREFIX, LAYOUT, "float32")
    ctx = mp.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe()
    child = ctx.Process(target=_child_attach, args=(owner.handle(), child_conn))
    try:
        pattern = np.arange(LAYOUT.block_nbytes, dtype=np.uint64).astype(np.uint8)
        owner.layer_bytes(2)[1] = pattern
        child.start()
        assert parent_conn.poll(20), "child did not answer"
        assert parent_conn.recv() == pattern.tobytes()
        assert parent_conn.poll(20) and parent_conn.recv() == "done"
        child.join(10)
        assert child.exitcode == 0
        assert (owner.layer_bytes(0)[5] == 7).all()
        assert (owner.layer_bytes(0)[4] == 0).all()
        # The attacher's exit must not have unlinked the owner's segment (resource tracker).
        assert _leftovers() == [owner.name]
    finally:
        if child.is_alive():
            child.kill()
            child.join(5)
        owner.close()


def test_tensor_views_share_memory_and_regions() -> None:
    import torch

    with SharedKVCache.create(PREFIX, LAYOUT, torch.float32) as owner:
        tensors = owner.layer_tensors()
        assert [t.shape for t in tensors] == [torch.Size(LAYOUT.layer_shape)] * 3
        assert tensors[1].dtype == torch.float32
        regions = owner.regions()
        assert [t.data_ptr() for t in tensors] == list(regions.layer_addrs)
        assert regions.layer_addrs[1] - regions.layer_addrs[0] == owner.layer_stride
        tensors[1][3, 1] = 1.5
        row = owner.layer_bytes(1)[3].view(np.float32)
        assert (row[: row.size // 2] == 0).all() and (row[row.size // 2 :] == 1.5).all()
        with SharedKVCache.attach(owner.handle()) as other:
            assert torch.equal(other.layer_tensors()[1], tensors[1])
        del tensors, row


def test_views_stay_valid_after_close() -> None:
    owner = SharedKVCache.create(PREFIX, LAYOUT, "float32")
    view = owner.layer_bytes(0)
    view[0] = 3
    owner.close()
    assert _leftovers() == []  # the owner's close unlinked the name ...
    assert (view[0] == 3).all()  # ... but the mapping lives while a view does


def test_only_owner_unlinks_and_bad_handles_fail() -> None:
    owner = SharedKVCache.create(PREFIX, LAYOUT, "float32")
    try:
        attached = SharedKVCache.attach(owner.handle())
        with pytest.raises(SharedKVError):
            attached.unlink()
        attached.close()
        assert _leftovers() == [owner.name]
        with pytest.raises(SharedKVError):
            SharedKVCache.attach({**owner.handle(), "name": f"{PREFIX}_missing"})
        with pytest.raises(SharedKVError):
            SharedKVCache.attach({**owner.handle(), "version": 0})
        with pytest.raises(SharedKVError):
            SharedKVCache.create(PREFIX, LAYOUT, "float16")  # 2 bytes, layout says 4
    finally:
        owner.close()
