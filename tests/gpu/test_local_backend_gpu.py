"""The local transfer backend on a GPU, across three processes as deployed: P's cache (this
process), the messager mapping it and D's over CUDA IPC, D's cache; contiguous and scattered
destination blocks, every byte checked on D (benchmarks/gpu_pd.py's transfer measurement)."""

from __future__ import annotations

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
