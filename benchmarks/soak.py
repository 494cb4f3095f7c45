"""Soak: minutes of mixed load with client aborts on a local deployment, loopback only.

Streaming and non-streaming requests arrive as a Poisson process at a rate the tiny CPU config
can just sustain; a share of the streaming clients disconnect at a random point. The run must end
with no errors other than the intended disconnects, every KV block free, nothing tracked, and
flat memory on every actor (RSS sampled during the run). Prints one table and exits non-zero if a
check fails.

    python benchmarks/soak.py [--config configs/tiny-1p1d.yaml] [--minutes 5] [--rate 0.7]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests' harness (leak checks)

from cluster.config import load_config
from cluster.launcher import deploy
from tests.integration.harness import leaks_in


async def one_request(client: httpx.AsyncClient, model: str, rng: random.Random) -> str:
    """The outcome: "ok", "left" (an intended disconnect) or an error description."""
    words = " ".join(
        rng.choice(["alpha", "beta", "gamma", "delta", "river", "stone"])
        for _ in range(rng.randint(20, 200))
    )
    body = {
        "model": model,
        "prompt": words,
        "max_tokens": rng.randint(8, 48),
        "temperature": rng.choice([0.0, 0.8]),
        "ignore_eos": True,
    }
    if rng.random() < 0.5:
        response = await client.post("/v1/completions", json=body)
        return "ok" if response.status_code == 200 else f"HTTP {response.status_code}"
    leave_after = rng.randint(1, 20) if rng.random() < 0.4 else None
    events = 0
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            return f"HTTP {r.status_code}"
        async for line in r.aiter_lines():
            if '"error"' in line:
                return "stream error"
            events += line.startswith("data: ")
            if leave_after is not None and events >= leave_after:
                return "left"
    return "ok"


async def load(url: str, minutes: float, rate: float, seed: int) -> Counter:
    rng = random.Random(seed)
    outcomes: Counter = Counter()
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        tasks = []
        end = time.monotonic() + minutes * 60
        while time.monotonic() < end:
            tasks.append(asyncio.ensure_future(one_request(client, model, rng)))
            await asyncio.sleep(rng.expovariate(rate))
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            outcomes[result if isinstance(result, str) else type(result).__name__] += 1
    return outcomes


def sample_rss(dep) -> dict[str, float]:
    return {name: s.get("rss_mb", 0.0) for name, s in dep.stats(timeout_s=10).items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny-1p1d.yaml")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--rate", type=float, default=0.7, help="requests per second")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = load_config(args.config)
    config.router.port = 0
    dep = deploy(config)
    try:
        asyncio.run(load(dep.url, 1.0, args.rate, args.seed + 1))  # warm-up: caches, arenas
        before = sample_rss(dep)
        outcomes = asyncio.run(load(dep.url, args.minutes, args.rate, args.seed))
        time.sleep(3)
        stats = dep.stats()
        after = {name: s.get("rss_mb", 0.0) for name, s in stats.items()}
        leaks = leaks_in(stats)
    finally:
        dep.stop()
    return report(args, outcomes, before, after, leaks)


def report(args, outcomes: Counter, before: dict, after: dict, leaks: list[str]) -> int:
    print(f"\nsoak: {args.config}, {args.minutes} min at {args.rate} req/s")
    print("| outcome | requests |\n| --- | ---: |")
    for outcome, count in sorted(outcomes.items()):
        print(f"| {outcome} | {count} |")
    print("\n| actor | private RSS before MiB | after MiB | growth |\n| --- | ---: | ---: | ---: |")
    grown = []
    for name in sorted(after):
        growth = after[name] - before.get(name, 0.0)
        print(f"| {name} | {before.get(name, 0.0):.0f} | {after[name]:.0f} | {growth:+.0f} |")
        if growth > max(64.0, 0.1 * before.get(name, 0.0)):
            grown.append(name)
    unexpected = {k: v for k, v in outcomes.items() if k not in ("ok", "left")}
    print(
        f"\nunexpected outcomes: {unexpected or 'none'}; leaks: {leaks or 'none'}; "
        f"memory grown: {grown or 'none'}"
    )
    return 1 if unexpected or leaks or grown else 0


if __name__ == "__main__":
    sys.exit(main())
