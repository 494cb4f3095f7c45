"""Tensor-parallel sharding without processes: which heads a rank holds, that the shards of
every rank put together are the whole model (checkpoint and random weights), and the step plan
codec."""

from __future__ import annotations

import pytest
import torch

from engine.batch import ScheduledChunk, SchedulerOutput
from engine.sampling_params import SamplingParams
from worker.distributed import TPGroup, shard_layout
from worker.loader import load_model
from worker.model_config import ModelLoadError, load_model_config, parse_model_config
from worker.random_weights import random_weights
from worker.tp_plan import PlanError, decode_plan, encode_step, encode_stop


def _arch(heads: int, kv_heads: int, inter: int = 128, vocab: int = 255):
    return parse_model_config(
        dict(
            architectures=["LlamaForCausalLM"],
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=inter,
            num_hidden_layers=2,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=8,
        )
    )


def test_heads_split_and_kv_heads_replicate_when_fewer_than_ranks():
    config = _arch(heads=8, kv_heads=2)
    two = [shard_layout(config, r, 2) for r in range(2)]
    assert [(s.head_start, s.heads, s.kv_head_start, s.kv_heads) for s in two] == [
        (0, 4, 0, 1),
        (4, 4, 1, 1),
    ]
    four = [shard_layout(config, r, 4) for r in range(4)]
    # query heads 0-3 read KV head 0, 4-7 read KV head 1: ranks 0, 1 hold KV head 0
    assert [(s.head_start, s.kv_head_start, s.kv_heads) for s in four] == [
        (0, 0, 1),
        (2, 0, 1),
        (4, 1, 1),
        (6, 1, 1),
    ]
    # vocabulary 255 over 2 ranks: 128 rows each, the last one padding
    assert [(s.vocab_start, s.vocab_rows) for s in two] == [(0, 128), (128, 128)]


@pytest.mark.parametrize(
    ("heads", "kv_heads", "inter", "size", "named"),
    [
        (6, 2, 128, 4, "6 attention heads"),
        (8, 2, 128, 3, "2 KV heads"),
        (8, 8, 100, 8, "intermediate size 100"),
        (8, 4, 128, 3, "8 attention heads"),
    ],
)
def test_a_split_that_does_not_divide_names_the_key(heads, kv_heads, inter, size, named):
    with pytest.raises(ModelLoadError, match=f"tensor_parallel_size {size}.*{named}"):
        shard_layout(_arch(heads, kv_heads, inter), 0, size)


def _whole_from_shards(shards: list, config) -> dict[str, torch.Tensor]:
    """Put every rank's layer-0 tensors back together in the whole model's layout."""
    hd = config.head_dim
    layers = [s.weights.layers[0] for s in shards]
    local = shards[0].config
    q, kv = local.num_heads * hd, local.num_kv_heads * hd

    qs = torch.cat([ly.qkv[:q] for ly in layers])
    ks = [ly.qkv[q : q + kv] for ly in layers]
    vs = [ly.qkv[q + kv : q + 2 * kv] for ly in layers]
    inter = local.intermediate_size
    gates = torch.cat([ly.gate_up[:inter] for ly in layers])
    ups = torch.cat([ly.gate_up[inter:] for ly in layers])
    return dict(
        q=qs,
        k=torch.cat(ks),
        v=torch.cat(vs),
        o=torch.cat([ly.o_proj for ly in layers], dim=1),
        gate_up=torch.cat([gates, ups]),
        down=torch.cat([ly.down for ly in layers], dim=1),
        embed=torch.cat([s.weights.embed for s in shards])[: config.vocab_size],
    )


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3"])
def test_checkpoint_shards_put_together_are_the_whole_model(checkpoints, name):
    path = checkpoints[name].path
    config = load_model_config(path)
    whole = _load_plain(path, None)
    shards = [_load_plain(path, TPGroup(r, 2, None)) for r in range(2)]
    layer = whole.weights.layers[0]
    q, kv = config.q_size, config.kv_size
    expected = dict(
        q=layer.qkv[:q],
        k=layer.qkv[q : q + kv],
        v=layer.qkv[q + kv :],
        o=layer.o_proj,
        gate_up=layer.gate_up,
        down=layer.down,
        embed=whole.weights.embed,
    )
    rebuilt = _whole_from_shards(shards, config)
    if config.num_kv_heads < 2:  # replicated: each rank holds the one KV head
        rebuilt["k"], rebuilt["v"] = rebuilt["k"][:kv], rebuilt["v"][:kv]
    for key, tensor in expected.items():
        torch.testing.assert_close(rebuilt[key], tensor, rtol=0, atol=0, msg=key)
    biased = [s.weights.layers[0].o_bias is not None for s in shards]
    assert biased == [config.o_bias, False]  # a row-parallel bias is added once


def test_random_weight_shards_are_slices_of_the_same_model(checkpoints):
    config = load_model_config(checkpoints["qwen3"].path)
    whole = random_weights(config, torch.float32, torch.device("cpu"))
    shards = [
        random_weights(config, torch.float32, torch.device("cpu"), shard_layout(config, r, 2))
        for r in range(2)
    ]
    h = config.num_heads // 2 * config.head_dim
    layer = whole.layers[0]
    torch.testing.assert_close(shards[1].layers[0].qkv[:h], layer.qkv[h : 2 * h])
    torch.testing.assert_close(
        torch.cat([s.layers[0].down for s in shards], dim=1), layer.down, rtol=0, atol=0
    )
    torch.testing.assert_close(shards[1].embed, whole.embed[config.vocab_size // 2 :])
    assert shards[1].vocab_start == config.vocab_size // 2


class _PlainLinear:
    name = "dense"

    def prepare(self, weight: torch.Tensor) -> torch.Tensor:
        return weight


def _load_plain(path, tp: TPGroup | None):
    """The model (or one rank's shard) with unpacked weights, so tensors can be compared."""
    import worker.models.llama as llama

    original = llama.select_linear
    llama.select_linear = lambda device, dtype: _PlainLinear()
    try:
        return load_model(path, torch.float32, "cpu", tp=tp)
    finally:
        llama.select_linear = original


def test_plan_round_trip():
    params = SamplingParams(temperature=0.7, top_p=0.9, seed=5, stop=["x"], logprobs=2)
    sched = SchedulerOutput(
        7,
        [
            ScheduledChunk("a", [1, 2, 3], 0, [4, 5], True, params, 0, None),
            ScheduledChunk("b", [-1], 17, [9], True, SamplingParams(temperature=0.0), 3, [8, -1]),
        ],
        ["gone"],
    )
    assert decode_plan(encode_step(sched)) == sched
    assert decode_plan(encode_stop()) is None
    with pytest.raises(PlanError):
        decode_plan(b"\x93\x63\x01\x02")
