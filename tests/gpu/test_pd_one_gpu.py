"""PD on GPUs: a prefill and a decode instance share one GPU (half each) -- or, on a machine with
two, take one each -- the cache messager maps P's device KV over CUDA IPC and writes it into D's
over NIXL; greedy output must equal a colocated (mixed) instance's token for token.

fp32, so equality is robust (no bf16 near-ties); requests go one at a time, so both deployments
run the same batch shapes. Then a concurrent burst must complete with every block free.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from benchmarks.model_folders import write_word_tokenizer
from cluster.config import parse_config
from cluster.launcher import Deployment, deploy
from tests.gpu.test_gpu_engine import MID  # hidden 1024, 4 layers, 16/4 heads, vocab 4096
from tests.integration.harness import assert_all_free, run_load
from tests.unit.worker.conftest import save_llama

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

VOCAB = MID["vocab_size"]
MAX_TOKENS = 24
ENGINE = {
    # 32 sequences: the burst below (20 at once) must fit D, or P refuses with 503 overloaded.
    "scheduler": {"max_num_seqs": 32, "max_num_batched_tokens": 512, "block_size": 16},
    "cache": {"memory_mb": 512},
}


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pd_gpu") / "mid"
    save_llama(folder, **MID)
    write_word_tokenizer(folder, VOCAB)
    return folder


def prompts() -> list[list[int]]:
    """Token-id prompts: short, one block exactly, several blocks, and a long chunked one."""
    rng = random.Random(7)
    return [[rng.randrange(2, VOCAB) for _ in range(n)] for n in (5, 16, 37, 200, 700)]


def config(folder: Path, gpus_per_instance: float | None) -> Any:
    """None: one colocated (mixed) instance; else 1P1D with that GPU share each."""
    model = {"path": str(folder), "device": "cuda", "dtype": "float32"}
    raw: dict[str, Any] = {"model": model, "router": {"port": 0, "num_cpus": 0.1}}
    if gpus_per_instance is None:
        raw["prefill"] = {"instances": 0}
        raw["decode"] = {"instances": 0}
        raw["mixed"] = {"instances": 1, "engine": ENGINE, "placement": {"num_gpus": 1}}
    else:
        share = {"num_cpus": 1, "num_gpus": gpus_per_instance}
        raw["prefill"] = {"instances": 1, "engine": ENGINE, "placement": share}
        raw["decode"] = {"instances": 1, "engine": ENGINE, "placement": share}
        raw["transfer"] = {"backend": "nixl"}
    return parse_config(raw)


@pytest.fixture(scope="module")
def colocated_texts(model_folder: Path) -> list[str]:
    colocated = deploy(config(model_folder, None))
    try:
        texts = complete_one_by_one(colocated)
    finally:
        colocated.stop()
    assert all(len(text.split()) == MAX_TOKENS for text in texts)  # one word per token
    return texts


def complete_one_by_one(dep: Deployment) -> list[str]:
    model = httpx.get(f"{dep.url}/v1/models").json()["data"][0]["id"]
    texts = []
    for prompt in prompts():
        body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
        }
        response = httpx.post(f"{dep.url}/v1/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        assert choice["finish_reason"] == "length"
        texts.append(choice["text"])
    return texts


@pytest.mark.parametrize("share", [0.5, 1.0], ids=["one_gpu", "two_gpus"])
def test_pd_matches_colocated(model_folder: Path, colocated_texts: list[str], share) -> None:
    if share == 1.0 and torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    dep = deploy(config(model_folder, share))
    try:
        assert complete_one_by_one(dep) == colocated_texts
        burst = run_load(dep.url, prompts() * 4, MAX_TOKENS)  # streamed and not, at once
        assert len(burst) == 4 * len(prompts())
        stats = assert_all_free(dep)
        prefill = stats["prefill-0"]
        # Every request moved its KV (a burst request whose first token is EOS would not).
        assert prefill["counters"]["transfers_ok"] >= len(prompts()) + 3 * len(prompts())
        assert prefill["counters"].get("transfers_failed", 0) == 0
        assert stats["messager-0"]["transfer"].get("writes", 0) > 0
    finally:
        dep.stop()
