"""Shared pieces of the cluster tests: deploy a config, run load, prove nothing leaked."""

from __future__ import annotations

import asyncio
import copy
import json
import time
from typing import Any

import httpx

from cluster.config import PdserveConfig, parse_config
from cluster.launcher import Deployment, deploy

SYSTEM = (
    "You are a careful assistant. Answer briefly and precisely, and never invent facts. "
    "Think about units, names and dates before you answer."
)
TOPICS = [
    "the capital of France",
    "why the sky is blue",
    "how a bicycle stays upright",
    "what a prime number is",
    "the boiling point of water",
    "who wrote Hamlet",
    "how plants make food",
    "what the moon is made of",
]


def prompts(count: int = 16, long_every: int = 4) -> list[str]:
    """Short and long prompts; many share the SYSTEM prefix (prefix-cache hits on P)."""
    out = []
    for i in range(count):
        topic = TOPICS[i % len(TOPICS)]
        if i % long_every == 0:  # longer than one prefill chunk of the test configs
            body = " ".join(f"Fact {k}: {TOPICS[(i + k) % len(TOPICS)]}." for k in range(20))
            out.append(f"{SYSTEM} {body} Now tell me about {topic}.")
        elif i % 2:
            out.append(f"{SYSTEM} Question {i}: tell me about {topic}.")
        else:
            out.append(f"Tell me about {topic}.")
    return out


def small_config(**sections: Any) -> PdserveConfig:
    """A small CPU config: tiny chunks so long prompts are chunked, port 0, short timeouts."""
    engine = {
        "scheduler": {"max_num_seqs": 16, "max_num_batched_tokens": 64, "block_size": 16},
        "cache": {"memory_mb": 96},
    }
    raw: dict[str, Any] = {
        "model": {"device": "cpu", "dtype": "float32"},
        "router": {"port": 0, "num_cpus": 0.1},
        "prefill": {
            "instances": 1,
            "allocation_timeout_s": 2.0,
            "max_backlog_tokens": 256,
            "engine": copy.deepcopy(engine),
            "placement": {"num_cpus": 0.5},
        },
        "decode": {
            "instances": 1,
            "engine": copy.deepcopy(engine),
            "placement": {"num_cpus": 0.5},
        },
    }
    for key, value in sections.items():
        merge(raw.setdefault(key, {}), value)
    return parse_config(raw)


def merge(into: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value


def start(config: PdserveConfig) -> Deployment:
    return deploy(config)


async def model_id(client: httpx.AsyncClient) -> str:
    response = await client.get("/v1/models")
    response.raise_for_status()
    return response.json()["data"][0]["id"]


async def complete(
    client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int, stream: bool
) -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    if not stream:
        response = await client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]
    text = []
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            raise AssertionError((await r.aread()).decode())
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                text.extend(c["text"] for c in chunk["choices"])
    return "".join(text)


def run_load(url: str, prompt_list: list[str], max_tokens: int) -> list[str]:
    """All prompts at once, alternating streaming and non-streaming."""

    async def main() -> list[str]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            model = await model_id(client)
            jobs = [
                complete(client, model, p, max_tokens, stream=bool(i % 2))
                for i, p in enumerate(prompt_list)
            ]
            return await asyncio.gather(*jobs)

    return asyncio.run(main())


def assert_all_free(dep: Deployment, timeout_s: float = 20.0) -> dict:
    """Every KV block on every P and D is free, and no component tracks a request (actors that
    do not answer, e.g. a stopped process, are skipped)."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = dep.stats(timeout_s=5.0)
        leaks = leaks_in(stats)
        if not leaks:
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"resources still held after {timeout_s} s: {leaks}")
        time.sleep(0.2)


def leaks_in(stats: dict) -> list[str]:
    leaks = []
    for name, s in stats.items():
        if "error" in s:
            continue
        if name == "router":
            if s.get("inflight_requests"):
                leaks.append(f"router: {s['inflight_requests']} in flight")
            continue
        if "num_blocks" in s and s["free_blocks"] != s["num_blocks"]:
            leaks.append(f"{name}: {s['num_blocks'] - s['free_blocks']} blocks held")
        for key in ("requests", "tracked", "tasks", "deferred", "prepare_queue"):
            if s.get(key):
                leaks.append(f"{name}: {key}={s[key]}")
    return leaks


def wait_until(condition, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.2)


# Counters that move only when a request ended with an error inside the cluster, an instance ran
# out of capacity, or a message was lost: in a run without faults or overload all stay at zero.
# Transfers cancelled on purpose (a request that finished on P, a client that left) count as
# `transfers_cancelled`, not here.
FAILURE_COUNTERS = (
    "failed_requests",
    "overloaded_requests",
    "requests_ended_by_failure",
    "router_send_failures",
    "messager_send_failures",
    "leases_expired",
    "allocations_refused",
    "missed_tasks",
    "transfers_failed",
    "handler_errors",
    "loop_errors",
)


def failures_in(stats: dict) -> list[str]:
    """Every failure counter (and malformed-frame count) that is not zero, by actor."""
    failures = []
    for name, s in stats.items():
        counters = {**s.get("counters", {}), "bad_frames": s.get("bad_frames", 0)}
        failures += [
            f"{name}: {k}={counters[k]}"
            for k in (*FAILURE_COUNTERS, "bad_frames")
            if counters.get(k)
        ]
    return failures
