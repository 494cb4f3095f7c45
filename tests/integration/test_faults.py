"""Faults on a live 1P2D deployment: abort storms, a stalled cache messager (transfer deadline
and KV lease expire), and recovery — every block on every instance free afterwards."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time

import httpx
import pytest

from tests.integration.conftest import MAX_TOKENS
from tests.integration.harness import (
    assert_all_free,
    model_id,
    prompts,
    run_load,
    small_config,
    start,
)

pytestmark = pytest.mark.timeout(400)


@pytest.fixture(scope="module")
def dep():
    config = small_config(
        # Migration off: these tests check that faults end requests with a clear error and
        # free everything (with it on, a failed request moves on: test_migration.py).
        router={
            "first_token_timeout_s": 30,
            "next_token_timeout_s": 20,
            "migrate_on_failure": False,
        },
        prefill={"transfer_timeout_s": 2.0},
        decode={"instances": 2, "kv_lease_timeout_s": 15.0, "placement": {"num_cpus": 0.3}},
    )
    deployment = start(config)
    yield deployment
    deployment.stop()


async def _stream(client: httpx.AsyncClient, body: dict, disconnect_after: int | None) -> str:
    """The finish reason of a streamed request, or "left" when the client disconnects (closing
    the connection) after `disconnect_after` events."""
    events = 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            events += 1
            for choice in json.loads(line[6:]).get("choices", []):
                if choice.get("finish_reason"):
                    return choice["finish_reason"]
            if disconnect_after is not None and events >= disconnect_after:
                return "left"
    raise AssertionError("stream ended without a finish reason")


def test_abort_storm_frees_everything(dep) -> None:
    rng = random.Random(3)

    async def main() -> list[str]:
        async with httpx.AsyncClient(base_url=dep.url, timeout=120) as client:
            model = await model_id(client)
            jobs = []
            for i, prompt in enumerate(prompts(24)):
                body = {
                    "model": model,
                    "prompt": prompt,
                    "max_tokens": 40,
                    "temperature": 0,
                    "ignore_eos": True,
                    "stream": True,
                }
                leave = rng.randint(1, 30) if i % 2 else None
                jobs.append(_stream(client, body, leave))
            return await asyncio.gather(*jobs)

    finishes = asyncio.run(main())
    assert finishes[0::2] == ["length"] * 12  # the clients that stayed got all 40 tokens
    assert_all_free(dep)


def test_stalled_messager_errors_then_recovers(dep, reference_outputs) -> None:
    pid = dep.stats()["messager-0"]["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        response = httpx.post(
            f"{dep.url}/v1/completions",
            json={
                "model": "SmolLM2-135M-Instruct",
                "prompt": prompts()[1],
                "max_tokens": 8,
                "temperature": 0,
                "ignore_eos": True,
            },
            timeout=60,
        )
        elapsed = time.monotonic() - started
        # P gave up on the transfer and freed; D's lease ran out and freed: nothing is held
        # while the messager is still stopped.
        assert response.status_code >= 500, response.text
        assert "transfer" in response.json()["error"]["message"].lower()
        assert elapsed < 30
        stats = assert_all_free(dep, timeout_s=45)
        assert stats["prefill-0"]["counters"].get("transfers_failed", 0) >= 1
    finally:
        os.kill(pid, signal.SIGCONT)
    # The messager wakes to a backlog of stale work: it must write nothing (the write deadline
    # passed), and the deployment must serve correctly again.
    time.sleep(1.0)
    prompt_list = prompts()[:6]
    texts = run_load(dep.url, prompt_list, MAX_TOKENS)
    for prompt, text in zip(prompt_list, texts, strict=True):
        assert text == reference_outputs[prompt]
    stats = assert_all_free(dep)
    assert (
        stats["decode-0"]["counters"].get("leases_expired", 0)
        + stats["decode-1"]["counters"].get("leases_expired", 0)
        >= 1
    )
