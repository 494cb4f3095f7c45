"""Tensor parallelism on two GPUs through the router. A mixed instance: the instance actor (rank 0)
and a rank actor in one placement group, joined by NCCL, serve exactly what a one-GPU mixed
instance serves (fp32), then a concurrent burst with every block free after. And PD with P at TP 2
and D at TP 1 sharing the two GPUs serves the same.

Run: python -m pytest -m gpu tests/gpu/test_tp_serving.py
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import ray
import torch

from cluster.config import parse_config
from cluster.launcher import deploy
from tests.gpu.test_pd_one_gpu import (  # noqa: F401 (fixtures)
    ENGINE,
    MAX_TOKENS,
    colocated_texts,
    complete_one_by_one,
    model_folder,
    prompts,
)
from tests.integration.harness import assert_all_free, failures_in, run_load

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs"),
]


def tp_config(folder: Path) -> Any:
    return parse_config(
        {
            "model": {"path": str(folder), "device": "cuda", "dtype": "float32"},
            "router": {"port": 0, "num_cpus": 0.1},
            "prefill": {"instances": 0},
            "decode": {"instances": 0},
            "mixed": {
                "instances": 1,
                "engine": {**ENGINE, "tensor_parallel_size": 2},
                "placement": {"num_cpus": 1, "num_gpus": 1},
            },
        }
    )


def test_tp2_mixed_instance_serves_what_one_gpu_serves(
    model_folder: Path,  # noqa: F811
    colocated_texts: list[str],  # noqa: F811
) -> None:
    dep = deploy(tp_config(model_folder))
    try:
        assert ray.get_actor("mixed-0-rank-1", namespace="pdserve") is not None
        assert complete_one_by_one(dep) == colocated_texts
        burst = run_load(dep.url, prompts() * 4, MAX_TOKENS)
        assert len(burst) == 4 * len(prompts())
        stats = assert_all_free(dep)
        assert not failures_in(stats)
    finally:
        dep.stop()


def pd_tp_config(folder: Path) -> Any:
    """P at TP 2 and D at TP 1 on two GPUs: each P rank takes 0.75 of a GPU, so Ray must put
    the two on different GPUs (NCCL needs that), and D takes the 0.25 left on either."""
    engine = {**ENGINE}
    return parse_config(
        {
            "model": {"path": str(folder), "device": "cuda", "dtype": "float32"},
            "router": {"port": 0, "num_cpus": 0.1},
            "transfer": {"backend": "nixl"},
            "prefill": {
                "instances": 1,
                "engine": {**engine, "tensor_parallel_size": 2},
                "placement": {"num_cpus": 1, "num_gpus": 0.75},
            },
            "decode": {
                "instances": 1,
                "engine": engine,
                "placement": {"num_cpus": 1, "num_gpus": 0.25},
            },
        }
    )


def test_pd_with_prefill_tp2_decode_tp1_serves_what_one_gpu_serves(
    model_folder: Path,  # noqa: F811
    colocated_texts: list[str],  # noqa: F811
) -> None:
    """The messager maps both P ranks' caches (two GPUs, CUDA IPC) and writes each rank's KV
    heads into D's cache over NIXL."""
    dep = deploy(pd_tp_config(model_folder))
    try:
        assert ray.get_actor("prefill-0-rank-1", namespace="pdserve") is not None
        assert complete_one_by_one(dep) == colocated_texts
        burst = run_load(dep.url, prompts() * 4, MAX_TOKENS)
        assert len(burst) == 4 * len(prompts())
        stats = assert_all_free(dep)
        assert not failures_in(stats)
        assert stats["messager-0"]["transfer"].get("writes", 0) > 0
    finally:
        dep.stop()
