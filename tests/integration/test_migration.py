"""Migration on a live 1P2D deployment: a decode instance killed under 16 concurrent greedy
streams costs the clients nothing. Its streams go on through the prefill instance (prompt + the
tokens so far) on the other decode instance, each identical to an undisturbed run, and every
block is free afterwards. Each decode instance runs at most 8 sequences, so the 16 streams fill
both and the survivor has no room for the moved ones at first: they wait for capacity
(router.capacity_wait_s) instead of failing."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import httpx
import pytest

from tests.integration.harness import assert_all_free, prompts, small_config, start, wait_until

pytestmark = pytest.mark.timeout(900)

STREAMS = 16
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def dep():
    config = small_config(
        router={"first_token_timeout_s": 300, "next_token_timeout_s": 300},
        prefill={"placement": {"num_cpus": 0.25}},
        decode={
            "instances": 2,
            "placement": {"num_cpus": 0.25},
            "engine": {"scheduler": {"max_num_seqs": STREAMS // 2}},
        },
        cluster={"health_check_interval_s": 0.5},
    )
    deployment = start(config)
    yield deployment
    deployment.stop()


async def _stream(client: httpx.AsyncClient, prompt: str, progress: list[int], i: int) -> dict:
    body = {
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    text, errors, finish = [], [], None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                errors.append(chunk["error"]["message"])
                continue
            text.append(chunk["choices"][0]["text"])
            finish = chunk["choices"][0]["finish_reason"] or finish
            progress[i] += 1
    return {"text": "".join(text), "errors": errors, "finish": finish}


async def _run(url: str, kill_pid: int | None = None) -> list[dict]:
    """16 streams at once; with `kill_pid`, SIGKILL it once every stream has streamed text."""
    progress = [0] * STREAMS
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        jobs = [
            asyncio.ensure_future(_stream(client, prompt, progress, i))
            for i, prompt in enumerate(prompts(STREAMS))
        ]
        if kill_pid is not None:
            while min(progress) < 3 and not all(j.done() for j in jobs):
                await asyncio.sleep(0.05)
            assert not any(j.done() for j in jobs), "streams ended before the kill"
            os.kill(kill_pid, signal.SIGKILL)
        return list(await asyncio.gather(*jobs))


def test_killed_decode_under_sixteen_streams_gives_no_errors(dep) -> None:
    undisturbed = asyncio.run(_run(dep.url))
    assert all(r["errors"] == [] and r["finish"] == "length" for r in undisturbed), undisturbed
    pid = dep.stats()["decode-0"]["pid"]
    disturbed = asyncio.run(_run(dep.url, kill_pid=pid))
    for before, after in zip(undisturbed, disturbed, strict=True):
        assert after["errors"] == [], after
        assert after["finish"] == "length"
        assert after["text"] == before["text"]
    router = dep.stats()["router"]
    assert router.get("moved_requests", 0) > 0  # decode-0 held some of them
    assert router["capacity_waits"] > 0 and router["capacity_waits_expired"] == 0, router
    wait_until(lambda: "decode-0" in dep.supervisor.recoveries, timeout_s=180)
    assert_all_free(dep)
