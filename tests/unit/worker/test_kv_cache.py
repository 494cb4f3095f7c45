from __future__ import annotations

import pytest
import torch

from worker.kv_cache import KVCache, make_kv_cache_spec, num_blocks_for_budget
from worker.model_config import load_model_config


def test_layout_budget_and_block_regions(checkpoints) -> None:
    config = load_model_config(checkpoints["llama"].path)  # 2 layers, 2 kv heads, head_dim 16
    block_bytes_all_layers = 2 * 8 * 2 * 16 * 4 * 2
    assert num_blocks_for_budget(config, 8, torch.float32, 10 * block_bytes_all_layers + 5) == 10
    with pytest.raises(ValueError, match="does not hold a single block"):
        num_blocks_for_budget(config, 8, torch.float32, 100)

    spec = make_kv_cache_spec(config, num_blocks=10, block_size=8, dtype=torch.float32)
    cache = KVCache.allocate(spec, "cpu")
    assert [tuple(t.shape) for t in cache.layers] == [(10, 2, 8, 2, 16)] * 2
    base = cache.layers[1].data_ptr()
    address, nbytes = cache.block_region(1, 3)
    assert (address - base, nbytes) == (3 * spec.block_bytes, spec.block_bytes)


def test_pre_made_tensors_are_used_in_place(checkpoints) -> None:
    config = load_model_config(checkpoints["llama"].path)
    spec = make_kv_cache_spec(config, num_blocks=4, block_size=8, dtype=torch.float32)
    tensors = [torch.zeros(spec.layer_shape) for _ in range(2)]
    cache = KVCache.from_tensors(spec, tensors)
    assert all(a is b for a, b in zip(cache.layers, tensors, strict=True))
    with pytest.raises(ValueError, match="expected 2 KV layer tensors"):
        KVCache.from_tensors(spec, tensors[:1])
    with pytest.raises(ValueError, match="KV layer 0: expected"):
        KVCache.from_tensors(spec, [torch.zeros(4, 2, 8, 2, 8), tensors[1]])
