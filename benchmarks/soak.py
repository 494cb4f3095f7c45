"""Soak: minutes of mixed load with client aborts on a local deployment, loopback only.

Streaming and non-streaming requests arrive as a Poisson process at a rate the tiny CPU config
can just sustain; a share of the streaming clients disconnect at a random point. The run must end
with no errors other than the intended disconnects, every KV block free, nothing tracked, and
flat memory on every actor: each actor's private RSS is sampled during the run (after a minute of
warm-up), and its peak in the second half of the run may exceed its peak in the first half by at
most GROWTH_LIMIT_MB (a leak of 0.75 MiB per request fails a 3-minute run at 0.7 requests/s,
less in a longer run; caches that fill up in the first half do not). Prints the outcomes, the
memory check and each actor's RSS minute by minute; exits non-zero if a check fails.

    python benchmarks/soak.py [--config configs/tiny-1p1d.yaml] [--minutes 5] [--rate 0.7]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests' harness (leak checks)

from cluster.config import load_config
from cluster.launcher import Deployment, deploy
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


# Private RSS may rise by this much from the first half's peak to the second half's. Peaks, not
# single samples: the prefill instance's RSS swings by tens of MiB between two malloc trims.
GROWTH_LIMIT_MB = 48.0
SAMPLE_EVERY_S = 20.0

RssSeries = list[tuple[float, dict[str, float]]]  # (seconds into the run, RSS by actor)


def sample_rss(dep: Deployment) -> dict[str, float]:
    return {name: s.get("rss_mb", 0.0) for name, s in dep.stats(timeout_s=10).items()}


async def soak(dep: Deployment, args: argparse.Namespace) -> tuple[Counter, RssSeries]:
    """The load, with every actor's RSS sampled every SAMPLE_EVERY_S meanwhile."""
    series: RssSeries = []
    done = asyncio.Event()

    async def sampler() -> None:
        start = time.monotonic()
        while not done.is_set():
            series.append((time.monotonic() - start, await asyncio.to_thread(sample_rss, dep)))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(done.wait(), SAMPLE_EVERY_S)

    sampling = asyncio.ensure_future(sampler())
    outcomes = await load(dep.url, args.minutes, args.rate, args.seed)
    done.set()
    await sampling
    return outcomes, series


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
        outcomes, series = asyncio.run(soak(dep, args))
        time.sleep(3)
        stats = dep.stats()
        series.append((series[-1][0] + 3, {n: s.get("rss_mb", 0.0) for n, s in stats.items()}))
        leaks = leaks_in(stats)
    finally:
        dep.stop()
    return report(args, outcomes, series, leaks)


def second_half_growth(series: RssSeries, name: str) -> tuple[float, float]:
    """An actor's RSS peak in the first and in the second half of the run."""
    half = series[-1][0] / 2
    first = [rss.get(name, 0.0) for t, rss in series if t < half]
    second = [rss.get(name, 0.0) for t, rss in series if t >= half]
    return max(first), max(second)


def report(args, outcomes: Counter, series: RssSeries, leaks: list[str]) -> int:
    print(f"\nsoak: {args.config}, {args.minutes} min at {args.rate} req/s")
    print("| outcome | requests |\n| --- | ---: |")
    for outcome, count in sorted(outcomes.items()):
        print(f"| {outcome} | {count} |")
    names = sorted(series[-1][1])
    print(
        f"\nprivate RSS, MiB (limit: second-half peak <= first-half peak + {GROWTH_LIMIT_MB:.0f})"
        "\n| actor | after warm-up | peak, first half | peak, second half | growth |"
        "\n| --- | ---: | ---: | ---: | ---: |"
    )
    grown = []
    for name in names:
        first, second = second_half_growth(series, name)
        start = series[0][1].get(name, 0.0)
        print(f"| {name} | {start:.0f} | {first:.0f} | {second:.0f} | {round(second - first):+d} |")
        if second - first > GROWTH_LIMIT_MB:
            grown.append(name)
    print_series(series, names)
    unexpected = {k: v for k, v in outcomes.items() if k not in ("ok", "left")}
    print(
        f"\nunexpected outcomes: {unexpected or 'none'}; leaks: {leaks or 'none'}; "
        f"memory grown: {grown or 'none'}"
    )
    return 1 if unexpected or leaks or grown else 0


def print_series(series: RssSeries, names: list[str]) -> None:
    """RSS minute by minute: the first sample at or after each whole minute, and the last."""
    picked, minute = [], 0
    for t, rss in series:
        if t >= minute * 60:
            picked.append((f"{minute} min", rss))
            minute = int(t // 60) + 1
    end = (f"end ({series[-1][0] / 60:.1f} min)", series[-1][1])
    if picked[-1][1] is series[-1][1]:
        picked[-1] = end
    else:
        picked.append(end)
    print("\n| actor | " + " | ".join(label for label, _ in picked) + " |")
    print("| --- |" + " ---: |" * len(picked))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{rss.get(name, 0.0):.0f}" for _, rss in picked) + " |")


if __name__ == "__main__":
    sys.exit(main())
