"""P's device KV shared over CUDA IPC, and the layer signals that wait for the GPU."""

from __future__ import annotations

import multiprocessing as mp
from multiprocessing.connection import Connection
from typing import Any

import pytest
import torch

from cache_transfer.cuda_kv import CudaKVCache, CudaKVError
from cache_transfer.factory import attach_shared_kv, make_shared_kv
from cache_transfer.layer_signals import MessagerLink
from cache_transfer.layout import KVLayout

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

LAYOUT = KVLayout(num_layers=3, num_blocks=64, block_size=16, kv_heads=4, head_dim=64, itemsize=2)


def _attacher(handle: dict[str, Any], conn: Connection) -> None:
    """Another process: map P's cache, report what it sees, write into it, report addresses."""
    cache = attach_shared_kv(handle)
    layers = cache.layer_tensors()
    conn.send([float(t.float().sum()) for t in layers])
    layers[2][5].fill_(3.0)
    torch.cuda.synchronize()
    regions = cache.regions()
    conn.send((regions.device, regions.mem_type, len(regions.layer_addrs)))
    conn.recv()  # keep the mapping until the owner checked
    cache.close()


def test_another_process_maps_the_same_device_memory() -> None:
    owner = make_shared_kv(LAYOUT, torch.bfloat16, torch.device("cuda"), "unused")
    assert isinstance(owner, CudaKVCache)
    layers = owner.layer_tensors()
    for t in layers:
        t.normal_()
    expected = [float(t.float().sum()) for t in layers]  # before the child writes
    neighbours = (layers[2][4].clone(), layers[1][5].clone())
    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    child = ctx.Process(target=_attacher, args=(owner.handle(), child_conn), daemon=True)
    child.start()
    try:
        assert conn.poll(60), "attacher did not start"
        assert conn.recv() == pytest.approx(expected, rel=1e-6)
        assert conn.poll(30)
        assert conn.recv() == ("cuda", "VRAM", LAYOUT.num_layers)
        assert torch.all(layers[2][5] == 3.0)  # the messager's view is P's memory, not a copy
        assert torch.equal(layers[2][4], neighbours[0]) and torch.equal(layers[1][5], neighbours[1])
    finally:
        conn.send("done")
        child.join(30)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0
    owner.close()


def test_attach_refuses_a_handle_of_an_unknown_gpu() -> None:
    owner = CudaKVCache.create(LAYOUT, torch.bfloat16, torch.device("cuda"))
    handle = owner.handle() | {"device_uuid": "GPU-00000000-0000-0000-0000-000000000000"}
    with pytest.raises(CudaKVError, match="not visible"):
        CudaKVCache.attach(handle)
    owner.close()


def test_layer_signal_waits_for_the_gpu() -> None:
    """The signal must leave only after the kernels queued before it finished."""
    seen: list[tuple[str, bool]] = []
    marker = torch.cuda.Event()

    def send(msg: str) -> None:
        seen.append((msg, marker.query()))

    link = MessagerLink(send, torch.device("cuda"), "p")
    a = torch.randn(4096, 4096, device="cuda")
    link.send("plan")
    for _ in range(40):  # tens of milliseconds of queued work
        a = a @ a
        a = a / a.norm()
    marker.record()
    link.layer_written("layer")
    link.send("done")
    link.close()
    assert [m for m, _ in seen] == ["plan", "layer", "done"]
    assert dict(seen)["layer"] is True
    assert link.dropped_signals == 0
