"""Where a PD request's time goes before its first decode token, measured server-side.

Deploys a topology (default: configs/tiny-1p1d.yaml on an embedded local Ray), sends requests
one at a time (so no queueing), and prints the router's TTFT split: prepare (P's blocks + D's
allocation), prefill queue, prefill, KV transfer (first token sampled -> KV complete on D; then
its parts: P's signals reaching the messager, the writes still behind, D taking the completion)
and the first decode step, next to the client-side TTFT.

    python benchmarks/pd_time_split.py [--config configs/tiny-1p1d.yaml] [--prompt-tokens 512]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import httpx
import ray

from cluster.config import load_config
from cluster.launcher import deploy


def one_request(url: str, model: str, prompt: list[int], max_tokens: int) -> float:
    """Client-side TTFT in ms of one streamed completion."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    start = time.perf_counter()
    ttft = None
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if ttft is None and line.startswith("data: "):
                ttft = (time.perf_counter() - start) * 1000
    assert ttft is not None
    return ttft


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny-1p1d.yaml")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=8)
    args = parser.parse_args()
    config = load_config(args.config)
    config.router.port = 0
    dep = deploy(config)
    try:
        model = httpx.get(f"{dep.url}/v1/models").json()["data"][0]["id"]
        # Distinct token-id prompts of exactly the requested length (no prefix-cache hits).
        rng = random.Random(0)
        prompts = [
            [rng.randint(1000, 20000) for _ in range(args.prompt_tokens)]
            for _ in range(args.requests + 2)
        ]
        for prompt in prompts[:2]:
            one_request(dep.url, model, prompt, args.max_tokens)  # warm-up
        time.sleep(0.5)
        ray.get(dep.router.reset_timings.remote())
        ttfts = [one_request(dep.url, model, p, args.max_tokens) for p in prompts[2:]]
        split = dep.stats()["router"]["ttft_split"]
    finally:
        dep.stop()
    print(f"\n{args.config}, prompts of {args.prompt_tokens} tokens, one request at a time")
    print("| phase | mean ms | p50 ms |")
    print("| --- | ---: | ---: |")
    for phase, values in split.items():
        # The transfer's parts (messager stamps) print as "transfer: signals", etc.
        label = phase.replace("transfer_", "transfer: ", 1)
        print(f"| {label} | {values['mean_ms']:.2f} | {values['p50_ms']:.2f} |")
    print(
        f"| TTFT at the client | {statistics.fmean(ttfts):.1f} | {statistics.median(ttfts):.1f} |"
    )


if __name__ == "__main__":
    main()
