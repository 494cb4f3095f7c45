"""2P2D over NIXL: identical output across instances; refusals and a stalled D go elsewhere."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from tests.integration.conftest import MAX_TOKENS
from tests.integration.harness import (
    assert_all_free,
    prompts,
    run_load,
    small_config,
    start,
    wait_until,
)

pytestmark = pytest.mark.timeout(300)
DECODE_BLOCKS = 100  # 1600 tokens per D: the long prompt below fits neither


@pytest.fixture(scope="module")
def dep():
    config = small_config(
        prefill={"instances": 2, "placement": {"num_cpus": 0.25}},
        decode={
            "instances": 2,
            "placement": {"num_cpus": 0.25},
            "engine": {"cache": {"num_blocks": DECODE_BLOCKS}},
        },
    )
    deployment = start(config)
    yield deployment
    deployment.stop()


def test_sixteen_concurrent_requests_match_single_engine(dep, reference_outputs) -> None:
    prompt_list = prompts()
    texts = run_load(dep.url, prompt_list, MAX_TOKENS)
    for prompt, text in zip(prompt_list, texts, strict=True):
        assert text == reference_outputs[prompt], prompt
    stats = assert_all_free(dep)
    for name in ("prefill-0", "prefill-1", "decode-0", "decode-1"):
        assert (
            stats[name]["counters"].get("requests", 0)
            + stats[name]["counters"].get("allocations_accepted", 0)
            > 0
        ), f"{name} served nothing"


def test_prompt_no_decode_can_hold_fails_clearly_without_leaks(dep) -> None:
    long_prompt = "word " * (DECODE_BLOCKS * 16 + 50)
    response = httpx.post(
        f"{dep.url}/v1/completions",
        json={"model": "SmolLM2-135M-Instruct", "prompt": long_prompt, "max_tokens": 4},
        timeout=60,
    )
    assert response.status_code == 503 and response.headers["Retry-After"]
    message = response.json()["error"]["message"]
    assert "no decode instance could take the request" in message
    assert "decode-0" in message and "decode-1" in message
    assert_all_free(dep)


def test_stalled_decode_sends_requests_to_the_other(dep, reference_outputs) -> None:
    stats = dep.stats()
    pid = stats["decode-0"]["pid"]
    before = stats["decode-1"]["counters"].get("allocations_accepted", 0)
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        prompt_list = prompts()[:6]
        texts = run_load(dep.url, prompt_list, MAX_TOKENS)
        elapsed = time.monotonic() - started
    finally:
        os.kill(pid, signal.SIGCONT)
    for prompt, text in zip(prompt_list, texts, strict=True):
        assert text == reference_outputs[prompt]
    assert elapsed < 60
    after = dep.stats()["decode-1"]["counters"].get("allocations_accepted", 0)
    assert after - before >= 5  # at most one request per P waited out the stalled D
    wait_until(lambda: not dep.stats()["decode-0"]["requests"])
    assert_all_free(dep)
