"""Elastic role switches on GPUs: 2P2D (a quarter of one GPU each, or half of one of two), the
messager of a decode-born instance maps its device KV over CUDA IPC after a switch to prefill,
and a prefill-born instance's decode role takes KV into the same device cache. Greedy output
before, after and during switches equals a colocated instance's, and every block is free after.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import ray
import torch

from cluster.config import parse_config
from cluster.launcher import deploy
from tests.gpu import test_pd_one_gpu as pd_gpu
from tests.gpu.test_pd_one_gpu import ENGINE, MAX_TOKENS, complete_one_by_one, prompts
from tests.integration.harness import assert_all_free, run_load

# The same model and colocated reference as the PD GPU test (pytest finds fixtures by name).
model_folder = pd_gpu.model_folder
colocated_texts = pd_gpu.colocated_texts

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def elastic_config(folder: Path) -> Any:
    share = 0.5 if torch.cuda.device_count() >= 2 else 0.25
    placement = {"num_cpus": 1, "num_gpus": share}
    return parse_config(
        {
            "model": {"path": str(folder), "device": "cuda", "dtype": "float32"},
            "router": {"port": 0, "num_cpus": 0.1},
            "prefill": {"instances": 2, "engine": ENGINE, "placement": placement},
            "decode": {"instances": 2, "engine": ENGINE, "placement": placement},
            "transfer": {"backend": "nixl"},
            "elastic": {"enabled": True, "decision_interval_s": 3600, "drain_timeout_s": 5.0},
        }
    )


def force(dep, name: str, role: str) -> dict:
    record = ray.get(dep.controller.force_switch.remote(name, role, 120.0), timeout=180)
    assert record["outcome"] == "done", record
    return record


def test_switches_keep_outputs_identical(model_folder: Path, colocated_texts: list[str]) -> None:
    dep = deploy(elastic_config(model_folder))
    try:
        assert complete_one_by_one(dep) == colocated_texts
        force(dep, "decode-1", "prefill")  # a messager maps its device KV now
        force(dep, "prefill-0", "decode")  # KV written into a prefill-born cache
        assert complete_one_by_one(dep) == colocated_texts
        burst: list[str] = []
        load = threading.Thread(
            target=lambda: burst.extend(run_load(dep.url, prompts() * 4, MAX_TOKENS))
        )
        load.start()
        force(dep, "decode-1", "decode")  # back, mid-burst
        force(dep, "prefill-0", "prefill")
        load.join(300)
        assert len(burst) == 4 * len(prompts())
        # run_load does not ignore EOS: a text may end early, never differ.
        for text, reference in zip(burst, colocated_texts * 4, strict=True):
            assert reference.startswith(text), (text, reference)
        stats = assert_all_free(dep)
        assert stats["prefill-0"]["role"] == "prefill" and stats["decode-1"]["role"] == "decode"
    finally:
        dep.stop()
