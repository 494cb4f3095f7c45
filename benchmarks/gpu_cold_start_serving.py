"""Cold start through the router: a fresh PD deployment on one GPU, its first requests' TTFT
against steady state, with and without the engine warm-up.

    . .devbundle/activate.sh && python3 benchmarks/gpu_cold_start_serving.py --out cold.json

Each mode (engine.warmup off, then on) runs in a fresh process with an empty Triton cache (what a
fresh machine sees) and starts a fresh deployment: 1P1D sharing one GPU (half each,
`transfer.backend: local`, random bf16 weights of the Llama-3-8B shape), the real router, TTFT
measured at the client from the first streamed token. Per mode:
  1. ready: `deploy()` until the router's /health answers 200 (weights, KV caches, CUDA graphs,
     the warm-up when on, NIXL/IPC wiring);
  2. the first 20 requests, one at a time, prompts 2k +-50% tokens: each TTFT against the
     steady-state median for its length (3 fresh prompts of that length, measured after);
  3. capacity: 8 clients in a closed loop (as many as P batches), 40 requests of 16 output
     tokens: requests/s served. P and D share the GPU, so this is well below one over the
     lone-request TTFT;
  4. half that capacity: 100 Poisson arrivals, 16 output tokens each; TTFT p50 and p99 from
     arrival;
  5. Triton kernels compiled after ready in any process of the deployment: new entries in the
     shared Triton cache directory (should be 0).
The router's TTFT split (prepare, queue, prefill, transfer, first decode step) is kept per phase
(first 20, steady) to show where a slow first request spends its time.
Every prompt is fresh random tokens, so the prefix cache never serves one prompt to the next.
Goals (issue #15): each of the first 20 TTFTs <= 1.5x its steady p50; p99 <= 3x p50.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_cold_start import FIRST, LOADED_REQUESTS, MEAN_PROMPT, STEADY_REPEATS

CLOSED_LOOP_CLIENTS = 8


@dataclass(frozen=True)
class Plan:
    device: str = "cuda"
    shape: str = "llama3-8b"
    mean_prompt: int = MEAN_PROMPT
    first: int = FIRST
    loaded: int = LOADED_REQUESTS


# `--smoke`: the same path on CPU in a minute (a 135M shape, short prompts, few requests)
SMOKE = Plan(device="cpu", shape="smollm2-135m", mean_prompt=64, first=3, loaded=6)


def deployment_config(folder: Path, warmup: bool, plan: Plan):
    from cluster.config import parse_config

    def engine(max_seqs: int, max_tokens: int, memory_mb: int) -> dict:
        scheduler = {
            "max_num_seqs": max_seqs,
            "max_num_batched_tokens": max_tokens,
            "block_size": 16,
            "max_model_len": 4096,
        }
        return {"scheduler": scheduler, "cache": {"memory_mb": memory_mb}, "warmup": warmup}

    on_gpu = plan.device == "cuda"
    half_gpu = {"num_cpus": 2, "num_gpus": 0.5} if on_gpu else {"num_cpus": 0.5}
    return parse_config(
        {
            "model": {
                "path": str(folder),
                "device": plan.device,
                "dtype": "bfloat16" if on_gpu else "float32",
                "load_format": "random",
            },
            "router": {"port": 0},
            "prefill": {"instances": 1, "engine": engine(8, 4096, 4096), "placement": half_gpu},
            "decode": {
                "instances": 1,
                "overlap_schedule": True,
                "engine": engine(64, 512, 8192),
                "placement": half_gpu,
            },
            "transfer": {"backend": "local"},
            "cluster": {"startup_timeout_s": 900},
        }
    )


def take_split(dep) -> dict:
    """The router's TTFT split since the last call (then cleared)."""
    import ray

    split = dep.stats()["router"].get("ttft_split", {})
    ray.get(dep.router.reset_timings.remote(), timeout=30)
    return split


def kernels_compiled(cache_dir: Path) -> set[str]:
    """Triton writes one folder per compiled kernel variant into its cache directory, with the
    kernel's name in its files: "folder/kernel" each."""
    if not cache_dir.exists():
        return set()
    found = set()
    for entry in cache_dir.iterdir():
        names = sorted(f.stem for f in entry.glob("*.json") if not f.name.startswith("__"))
        if entry.is_dir() and names:
            found.add(f"{entry.name[:8]}/{names[0]}")
    return found


class Client:
    """Fresh random prompts, streamed through the router; TTFT at the client."""

    def __init__(self, url: str, model: str, vocab: int, rng: random.Random) -> None:
        from cluster.bench.client import OpenAIClient

        self.http = OpenAIClient(url, timeout=600)
        self.model, self.vocab, self.rng = model, vocab, rng

    async def ttft(self, length: int, max_tokens: int, origin: float | None = None) -> float:
        from cluster.bench.client import build_payload
        from cluster.bench.datasets import BenchRequest

        prompt = [self.rng.randrange(2, self.vocab) for _ in range(length)]
        request = BenchRequest(prompt=prompt, messages=None, max_tokens=max_tokens)
        payload = build_payload(request, "completions", self.model, 0.0, ignore_eos=True)
        start = time.perf_counter()
        record = await self.http.send(0, "completions", payload, start)
        if not record.success or record.ttft_s is None:
            raise RuntimeError(f"request failed: {record.error}")
        # From arrival when one is given (Poisson load), else from sending.
        return record.ttft_s + (start - origin if origin is not None else 0.0)


async def measure(url: str, model: str, vocab: int, plan: Plan, split: Callable[[], dict]):
    rng = random.Random(0)
    client = Client(url, model, vocab, rng)
    low, high = plan.mean_prompt // 2, 3 * plan.mean_prompt // 2
    async with client.http:
        lengths = [rng.randint(low, high) for _ in range(plan.first)]
        first = [await client.ttft(n, 2) for n in lengths]
        first_split = split()
        steady = []
        for n in lengths:
            repeats = [await client.ttft(n, 2) for _ in range(STEADY_REPEATS)]
            steady.append(statistics.median(repeats))
        steady_split = split()
        capacity = await closed_loop(client, rng, plan)
        loaded = await poisson(client, rng, capacity / 2, plan)
    ratios = [f / s for f, s in zip(first, steady, strict=True)]
    p50, p99 = statistics.median(loaded), sorted(loaded)[int(0.99 * (len(loaded) - 1))]
    return {
        "first_ttft_ms": [1e3 * t for t in first],
        "steady_ttft_ms": [1e3 * t for t in steady],
        "worst_first_ratio": max(ratios),
        "first_over_1_5x": sum(r > 1.5 for r in ratios),
        "capacity_rps": capacity,
        "loaded_rate": capacity / 2,
        "split_first": first_split,
        "split_steady": steady_split,
        "loaded_p50_ms": 1e3 * p50,
        "loaded_p99_ms": 1e3 * p99,
        "loaded_p99_over_p50": p99 / p50,
    }


async def poisson(client: Client, rng: random.Random, rate: float, plan: Plan) -> list[float]:
    begin = time.perf_counter()
    arrivals, at = [], begin
    for _ in range(plan.loaded):
        at += rng.expovariate(rate)
        arrivals.append(at)

    async def one(arrival: float, length: int) -> float:
        await asyncio.sleep(max(0.0, arrival - time.perf_counter()))
        return await client.ttft(length, 16, origin=arrival)

    lengths = [rng.randint(plan.mean_prompt // 2, 3 * plan.mean_prompt // 2) for _ in arrivals]
    return list(await asyncio.gather(*(one(a, n) for a, n in zip(arrivals, lengths, strict=True))))


async def closed_loop(client: Client, rng: random.Random, plan: Plan) -> float:
    """Requests/s that CLOSED_LOOP_CLIENTS clients, each sending its next prompt when its
    last one finished, get served."""
    todo = [rng.randint(plan.mean_prompt // 2, 3 * plan.mean_prompt // 2) for _ in range(40)]

    async def worker() -> None:
        while todo:
            await client.ttft(todo.pop(), 16)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CLOSED_LOOP_CLIENTS)))
    return 40 / (time.perf_counter() - started)


def child(warmup: bool, folder: Path, plan: Plan) -> dict:
    import httpx

    from benchmarks.model_folders import SHAPES, write_model_folder
    from cluster.launcher import deploy

    write_model_folder(folder, SHAPES[plan.shape])
    cache_dir = Path(os.environ["TRITON_CACHE_DIR"])
    started = time.monotonic()
    dep = deploy(deployment_config(folder, warmup, plan))
    try:
        assert httpx.get(f"{dep.url}/health", timeout=30).status_code == 200
        ready_s = time.monotonic() - started
        at_ready = kernels_compiled(cache_dir)
        model = httpx.get(f"{dep.url}/v1/models", timeout=30).json()["data"][0]["id"]
        vocab = SHAPES[plan.shape]["vocab_size"]
        figures = asyncio.run(measure(dep.url, model, vocab, plan, lambda: take_split(dep)))
        compiled_after = sorted(kernels_compiled(cache_dir) - at_ready)
    finally:
        dep.stop()
    return {"warmup": warmup, "ready_s": ready_s, "kernels_at_ready": len(at_ready),
            "compiled_after_ready": compiled_after, **figures}  # fmt: skip


def run_mode(warmup: bool, smoke: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, TRITON_CACHE_DIR=str(Path(tmp) / "triton"))
        cmd = [sys.executable, __file__, "--child", "on" if warmup else "off", "--folder", tmp]
        cmd += ["--smoke"] if smoke else []
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
        if out.returncode != 0:
            raise RuntimeError(f"mode warmup={warmup} failed:\n{out.stderr[-4000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])


def print_table(results: list[dict], plan: Plan) -> None:
    print(f"\n{plan}")
    print(
        "| warm-up | ready s | kernels at ready | compiled after ready |"
        " worst first-20 TTFT / steady | first-20 over 1.5x | capacity req/s | load req/s |"
        " TTFT p50 ms | p99 ms | p99/p50 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {'on' if r['warmup'] else 'off'} | {r['ready_s']:.1f} | {r['kernels_at_ready']} |"
            f" {len(r['compiled_after_ready'])} | {r['worst_first_ratio']:.2f}x |"
            f" {r['first_over_1_5x']} / {plan.first} | {r['capacity_rps']:.1f} |"
            f" {r['loaded_rate']:.1f} |"
            f" {r['loaded_p50_ms']:.1f} | {r['loaded_p99_ms']:.1f} |"
            f" {r['loaded_p99_over_p50']:.2f} |"
        )  # fmt: skip


def print_split(results: list[dict]) -> None:
    """Mean ms per TTFT phase (router stamps): the first 20 requests against steady state."""
    phases = sorted({k for r in results for k in r["split_first"]})
    print("\n| warm-up | phase | " + " | ".join(phases) + " |")
    print("|---|---|" + "---|" * len(phases))
    for r in results:
        for label in ("first", "steady"):
            split = r[f"split_{label}"]
            cells = [f"{split[k]['mean_ms']:.1f}" if k in split else "-" for k in phases]
            print(f"| {'on' if r['warmup'] else 'off'} | {label} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write every figure as JSON")
    parser.add_argument(
        "--modes", default="off,on", help="engine.warmup settings to run, in order (off,on)"
    )
    parser.add_argument("--smoke", action="store_true", help="CPU, small: checks the script")
    parser.add_argument("--child", choices=["on", "off"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    plan = SMOKE if args.smoke else Plan()
    if args.child is not None:
        print(json.dumps(child(args.child == "on", args.folder / "model", plan)))
        return
    results = [run_mode(mode == "on", args.smoke) for mode in args.modes.split(",")]
    print_table(results, plan)
    print_split(results)
    for r in results:
        print(f"compiled after ready (warm-up {r['warmup']}): {r['compiled_after_ready']}")
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
