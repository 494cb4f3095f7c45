"""Staged KV writes between tensor-parallel sizes on a GPU (cache_transfer/staging.py): every
prefill rank's cache in GPU memory, the decode ranks' in another process that maps them over
CUDA IPC, NIXL moving VRAM, the gather a device copy. benchmarks/tp_transfer.py's `bench`
compares the first and last layer's bytes on D with P's after each path's warm-up write and
raises if they differ."""

from __future__ import annotations

import pytest
import torch

from benchmarks.tp_transfer import bench

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize(("p_size", "d_size"), [(2, 1), (1, 2), (4, 1)])
def test_staged_writes_arrive_byte_exact_on_a_gpu(p_size, d_size) -> None:
    rows = bench(p_size, d_size, iters=1, staging_mb=[64, 4], per_token=True, device="cuda")
    assert [path for path, *_ in rows] == [
        "staged, 64 MiB ring",
        "staged, 4 MiB ring",
        "per-token",
    ]
    assert all(seconds > 0 for *_, seconds in rows)
