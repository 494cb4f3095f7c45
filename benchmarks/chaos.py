"""Chaos: steady load on a local 2P2D deployment while actors are killed and stalled.

Streaming requests (greedy and seeded, 16-48 tokens) arrive as a Poisson process. Every
--kill-every seconds the next action of the schedule hits one actor: SIGKILL a decode instance,
a prefill instance, a cache messager, or SIGSTOP a decode instance for --stall seconds. Before
each action the script waits (bounded) until the supervisor has brought the previous victim
back. Migration (router.migrate_on_failure) should keep every stream that had started going;
a request that never got a token may still fail while no instance can take it. At the end it
prints requests served, client-visible errors (before and after a stream's first token),
requests moved by the router, the times a stream under way waited for KV capacity, and KV blocks
still held once everything settled (leaked).
Loopback only; bounded by --minutes and --max-requests.

    python benchmarks/chaos.py [--config configs/cpu-2p2d.yaml] [--minutes 5] [--kill-every 30]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests' harness (leak checks)

from cluster.config import load_config
from cluster.launcher import Deployment, deploy
from tests.integration.harness import leaks_in

SCHEDULE = ("kill decode-0", "kill prefill-1", "kill messager-0", "stall decode-1")
WORDS = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "ember"]
_RECOVERY_S = 180.0  # longest wait for a killed actor to be back in service
_SETTLE_S = 60.0  # longest wait for every block to be free at the end


ERRORS: Counter = Counter()  # what the clients were told, for the report


async def one_request(client: httpx.AsyncClient, model: str, rng: random.Random) -> str:
    """The outcome: "ok", "error before start" or "error after start"."""
    body = {
        "model": model,
        "prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 150))),
        "max_tokens": rng.randint(16, 48),
        "temperature": rng.choice([0.0, 0.8]),
        "seed": rng.randrange(2**31),
        "ignore_eos": True,
        "stream": True,
    }
    started = False
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                ERRORS[f"HTTP {response.status_code}: {(await response.aread())[:120]!r}"] += 1
                return "error before start"
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    ERRORS[str(chunk["error"].get("message"))[:120]] += 1
                    return "error after start" if started else "error before start"
                started = True
    except httpx.HTTPError:
        return "error after start" if started else "error before start"
    return "ok"


async def load(url: str, minutes: float, rate: float, max_requests: int, seed: int) -> Counter:
    rng = random.Random(seed)
    outcomes: Counter = Counter()
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        tasks = []
        end = time.monotonic() + minutes * 60
        while time.monotonic() < end and len(tasks) < max_requests:
            tasks.append(asyncio.ensure_future(one_request(client, model, rng)))
            await asyncio.sleep(rng.expovariate(rate))
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            outcomes[result if isinstance(result, str) else type(result).__name__] += 1
    return outcomes


def chaos(dep: Deployment, until: float, every_s: float, stall_s: float) -> list[str]:
    """Run the schedule until `until` (monotonic); returns what was done, in order."""
    done: list[str] = []
    for action in itertools.cycle(SCHEDULE):
        if time.monotonic() + every_s > until:
            return done
        time.sleep(every_s)
        kind, name = action.split()
        pid = dep.stats(timeout_s=10)[name].get("pid")
        if pid is None:
            done.append(f"{action}: skipped (not answering)")
            continue
        recoveries = dep.supervisor.recoveries.count(name)
        if kind == "kill":
            os.kill(pid, signal.SIGKILL)
            back = _wait_back(dep, name, recoveries)
            done.append(f"{action}: back after {back:.0f} s" if back else f"{action}: not back")
        else:
            os.kill(pid, signal.SIGSTOP)
            try:
                time.sleep(stall_s)
            finally:
                os.kill(pid, signal.SIGCONT)
            done.append(f"{action} for {stall_s:g} s")
    return done


def _wait_back(dep: Deployment, name: str, recoveries: int) -> float | None:
    start = time.monotonic()
    while time.monotonic() - start < _RECOVERY_S:
        if dep.supervisor.recoveries.count(name) > recoveries:
            return time.monotonic() - start
        time.sleep(0.5)
    return None


def leaked_blocks(dep: Deployment) -> dict[str, int]:
    """KV blocks each instance still holds once nothing runs (after a bounded wait)."""
    deadline = time.monotonic() + _SETTLE_S
    while True:
        stats = dep.stats(timeout_s=10)
        if not leaks_in(stats) or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    return {
        name: s["num_blocks"] - s["free_blocks"]
        for name, s in stats.items()
        if "num_blocks" in s and "error" not in s
    }


async def run(dep: Deployment, args: argparse.Namespace) -> tuple[Counter, list[str]]:
    until = time.monotonic() + args.minutes * 60
    loop = asyncio.get_running_loop()
    actions = loop.run_in_executor(None, chaos, dep, until, args.kill_every, args.stall)
    outcomes = await load(dep.url, args.minutes, args.rate, args.max_requests, args.seed)
    return outcomes, await actions


def report(outcomes: Counter, actions: list[str], router: dict, leaks: dict[str, int]) -> None:
    print("\nactions")
    for action in actions:
        print(f"  {action}")
    print("\n| outcome | requests |\n| --- | ---: |")
    for outcome in ("ok", "error after start", "error before start"):
        print(f"| {outcome} | {outcomes.get(outcome, 0)} |")
    for outcome, count in sorted(outcomes.items()):
        if outcome not in ("ok", "error after start", "error before start"):
            print(f"| {outcome} | {count} |")
    print(f"| moved by the router (retried or migrated) | {router.get('moved_requests', 0)} |")
    waits, expired = router.get("capacity_waits", 0), router.get("capacity_waits_expired", 0)
    print(f"| waits for KV capacity (streams under way) | {waits} |")
    print(f"| of those, ran out (the client got the refusal) | {expired} |")
    print(f"| KV blocks leaked | {sum(leaks.values())} |")
    print(f"\nblocks held after settling: {leaks}")
    for message, count in ERRORS.most_common(10):
        print(f"  {count} x {message}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/cpu-2p2d.yaml")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--kill-every", type=float, default=30.0, help="seconds between actions")
    parser.add_argument("--stall", type=float, default=10.0, help="seconds a SIGSTOP lasts")
    parser.add_argument("--rate", type=float, default=0.5, help="requests per second")
    parser.add_argument("--max-requests", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = load_config(args.config)
    config.router.port = 0
    config.router.first_token_timeout_s = config.router.next_token_timeout_s = 300
    config.cluster.health_check_interval_s = 0.5
    dep = deploy(config)
    try:
        outcomes, actions = asyncio.run(run(dep, args))
        router = dep.stats(timeout_s=10).get("router", {})
        leaks = leaked_blocks(dep)
        report(outcomes, actions, router, leaks)
    finally:
        dep.stop()
    return 0 if outcomes.get("error after start", 0) == 0 and not any(leaks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
