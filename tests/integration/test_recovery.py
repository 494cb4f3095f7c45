"""Crashed actors on a live 2P2D deployment: clients get an error (or a transparent retry)
instead of a hang, new requests go to the survivors at once, and Ray's restart plus the
supervisor bring the instance back into service. Every block is free at the end."""

from __future__ import annotations

import asyncio
import os
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
    wait_until,
)

pytestmark = pytest.mark.timeout(500)


@pytest.fixture(scope="module")
def dep():
    config = small_config(
        # Migration off: these tests check how failures reach clients (test_migration.py has
        # them continue instead).
        router={
            "first_token_timeout_s": 120,
            "next_token_timeout_s": 120,
            "migrate_on_failure": False,
        },
        prefill={"instances": 2, "placement": {"num_cpus": 0.25}},
        decode={"instances": 2, "placement": {"num_cpus": 0.25}},
        cluster={"health_check_interval_s": 0.5},
    )
    deployment = start(config)
    yield deployment
    deployment.stop()


async def _long_streams(url: str, count: int) -> list[str]:
    """Start `count` long streams; returns 'ok' or the error text of each."""
    async with httpx.AsyncClient(base_url=url, timeout=200) as client:
        model = await model_id(client)

        async def one(i: int) -> str:
            body = {
                "model": model,
                "prompt": prompts()[i],
                "max_tokens": 200,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
            }
            async with client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    return (await response.aread()).decode()
                async for line in response.aiter_lines():
                    if '"error"' in line:
                        return line
            return "ok"

        return await asyncio.gather(*(one(i) for i in range(count)))


def test_killed_decode_fails_its_requests_fast_and_rejoins(dep, reference_outputs) -> None:
    pid = dep.stats()["decode-0"]["pid"]

    async def scenario() -> tuple[list[str], float]:
        streams = asyncio.ensure_future(_long_streams(dep.url, 6))
        await asyncio.sleep(4)  # let tokens flow from both decode instances
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        results = await streams
        return results, time.monotonic() - killed

    results, after_kill = asyncio.run(scenario())
    assert after_kill < 60  # no client waited for the 120 s token deadline
    assert any(r != "ok" for r in results)  # decode-0's requests ended with an error
    # New requests are served (by decode-1 now, by both once decode-0 is back).
    prompt_list = prompts()[:4]
    texts = run_load(dep.url, prompt_list, MAX_TOKENS)
    assert texts == [reference_outputs[p] for p in prompt_list]
    wait_until(lambda: "decode-0" in dep.supervisor.recoveries, timeout_s=120)
    texts = run_load(dep.url, prompts()[:8], MAX_TOKENS)
    assert texts == [reference_outputs[p] for p in prompts()[:8]]
    assert dep.stats()["decode-0"]["pid"] != pid
    assert_all_free(dep)


def test_killed_prefill_retries_requests_without_tokens(dep, reference_outputs) -> None:
    pid = dep.stats()["prefill-0"]["pid"]
    os.kill(pid, signal.SIGKILL)
    # Requests sent now may be routed to the dead prefill-0 before the router hears of it:
    # they are retried on prefill-1, so every client gets the right answer.
    prompt_list = prompts()[:6]
    texts = run_load(dep.url, prompt_list, MAX_TOKENS)
    assert texts == [reference_outputs[p] for p in prompt_list]
    wait_until(lambda: "prefill-0" in dep.supervisor.recoveries, timeout_s=120)
    texts = run_load(dep.url, prompts()[:8], MAX_TOKENS)
    assert texts == [reference_outputs[p] for p in prompts()[:8]]
    assert_all_free(dep)


def test_killed_messager_is_reattached(dep, reference_outputs) -> None:
    pid = dep.stats()["messager-0"]["pid"]
    os.kill(pid, signal.SIGKILL)
    # Ray restarts it; the supervisor attaches it to prefill-0's KV cache again and prefill-0
    # ends what the dead one held. Then both prefill instances serve correctly.
    wait_until(lambda: "messager-0" in dep.supervisor.recoveries, timeout_s=120)
    assert dep.stats()["messager-0"]["pid"] != pid
    prompt_list = prompts()[:8]
    texts = run_load(dep.url, prompt_list, MAX_TOKENS)
    assert texts == [reference_outputs[p] for p in prompt_list]
    stats = assert_all_free(dep)
    assert stats["messager-0"]["counters"]["writes"] > 0  # the new one streams KV
