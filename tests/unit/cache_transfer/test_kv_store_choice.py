"""Which KV store a prefill instance shares with its messager, and how the messager opens it."""

from __future__ import annotations

import os

import pytest
import torch

from cache_transfer.cuda_kv import CudaKVCache, CudaKVError
from cache_transfer.factory import attach_shared_kv, make_shared_kv
from cache_transfer.layout import KVLayout
from cache_transfer.shared_kv import SharedKVCache

LAYOUT = KVLayout(num_layers=2, num_blocks=4, block_size=4, kv_heads=2, head_dim=8, itemsize=4)
PREFIX = f"pdkvt{os.getpid()}choice"


def test_cpu_instance_shares_memory_the_messager_attaches() -> None:
    owner = make_shared_kv(LAYOUT, torch.float32, torch.device("cpu"), PREFIX)
    try:
        assert isinstance(owner, SharedKVCache)
        handle = owner.handle()
        assert handle["kind"] == "shm"
        attached = attach_shared_kv(handle)
        owner.layer_tensors()[1][2].fill_(7.0)
        assert torch.equal(
            attached.layer_tensors()[1][2], torch.full_like(owner.layer_tensors()[1][2], 7.0)
        )
        attached.close()
    finally:
        owner.close()
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(PREFIX)]


@pytest.mark.parametrize("handle", [{}, {"kind": "nfs"}, None, {"kind": "cuda_ipc", "version": 9}])
def test_unknown_or_bad_handles_are_refused(handle) -> None:
    with pytest.raises((ValueError, CudaKVError)):
        attach_shared_kv(handle)


def test_cuda_store_refuses_a_dtype_of_the_wrong_width() -> None:
    with pytest.raises(CudaKVError, match="bytes per item"):
        CudaKVCache.create(LAYOUT, torch.bfloat16, torch.device("cpu"))
