"""The local transfer backend on a GPU, across three processes as deployed: P's cache (this
process), the messager mapping it and D's over CUDA IPC, D's cache; contiguous and scattered
destination blocks, every byte checked on D (benchmarks/gpu_pd.py's transfer measurement)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.gpu_pd import measure_transfer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("kind", ["local", "nixl"])
def test_kv_lands_byte_exact_through_the_messager(kind) -> None:
    figures = measure_transfer(1024, iters=1, kind=kind)  # raises if D's bytes differ
    assert figures["contiguous_bytes_per_s"] > 0 and figures["scattered_bytes_per_s"] > 0


def test_copy_batches_of_any_size_use_the_warm_up_variant() -> None:
    """Batches of odd and even descriptor counts copy the right bytes and compile nothing
    after `warm_up` (a compile in a request's transfer costs it ~1 s)."""
    from cache_transfer.gpu_copy import GpuCopier, _copy_kernel

    def variants() -> int:
        return sum(len(cache[0]) for cache in _copy_kernel.device_caches.values())

    src = torch.randint(0, 2**62, (64, 512), device="cuda", dtype=torch.int64)
    dst = torch.zeros_like(src)
    copier = GpuCopier(0)
    copier.warm_up(dst.data_ptr())
    compiled = variants()
    row = src.stride(0) * 8
    for count in (1, 2, 3, 4, 7, 8):
        rows = np.arange(count, dtype=np.int64) * 3 % 64
        sizes = np.full(count, row, dtype=np.int64)
        copier.add(src.data_ptr() + rows * row, dst.data_ptr() + rows * row, sizes)
        copier.synchronize()
        assert torch.equal(dst[rows.tolist()], src[rows.tolist()])
    assert variants() == compiled
