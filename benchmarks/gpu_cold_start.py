"""Cold start on one GPU: TTFT of the first requests after an engine is ready, against steady state.

Each mode runs in a fresh process with an empty Triton cache (what a fresh machine sees):
    . .devbundle/activate.sh && python3 benchmarks/gpu_cold_start.py --out cold.json

The engine is a prefill-shaped one (Llama-3-8B shape, random bf16 weights, max_tokens 1: TTFT
is the prefill of the prompt and its first token). Per mode:
  1. ready: time to build the engine (weights, KV cache, CUDA graphs, and the warm-up when on);
  2. the first 20 requests, one at a time, prompts 2k +-50% tokens: each TTFT against the
     steady-state median for its length (3 fresh prompts of that length, measured after);
  3. half the prefill capacity: 100 Poisson arrivals at half the rate the steady state can
     serve, outputs of 16 tokens (decode and mixed steps too); TTFT p50 and p99 from arrival;
  4. Triton kernel variants compiled after ready (should be 0).
Every prompt is fresh random tokens, so the prefix cache never serves one run's prompt to the
next. Goals (issue #15): each of the first 20 TTFTs <= 1.5x its steady p50; p99 <= 3x p50.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FIRST = 20
STEADY_REPEATS = 3
LOADED_REQUESTS = 100
MEAN_PROMPT = 2048


def child(warmup: bool, folder: Path) -> dict:
    from benchmarks.model_folders import SHAPES, write_model_folder
    from engine.config import EngineConfig, ModelConfig, Role
    from worker.engine_core import EngineCore
    from worker.warmup import kernel_variants

    write_model_folder(folder, SHAPES["llama3-8b"])
    engine = EngineConfig.model_validate(
        {
            "scheduler": {
                "max_num_seqs": 64,
                "max_num_batched_tokens": 4096,
                "block_size": 16,
                "max_model_len": 4096,
            },
            "cache": {"num_blocks": 8192},
            "warmup": warmup,
        }
    )
    model = ModelConfig(path=str(folder), device="cuda", dtype="bfloat16", load_format="random")
    started = time.monotonic()
    core = EngineCore(model, engine, Role.MIXED, overlap=True)
    ready_s = time.monotonic() - started
    at_ready = kernel_variants()
    rng = random.Random(0)
    vocab = core.arch.vocab_size
    lengths = [rng.randint(MEAN_PROMPT // 2, 3 * MEAN_PROMPT // 2) for _ in range(FIRST)]
    first = [ttft_alone(core, rng, vocab, n) for n in lengths]
    steady = [
        statistics.median(ttft_alone(core, rng, vocab, n) for _ in range(STEADY_REPEATS))
        for n in lengths
    ]
    mean_service = statistics.mean(steady)
    loaded = loaded_ttfts(core, rng, vocab, rate=0.5 / mean_service)
    ratios = [f / s for f, s in zip(first, steady, strict=True)]
    p50, p99 = statistics.median(loaded), sorted(loaded)[int(0.99 * (len(loaded) - 1))]
    return {
        "warmup": warmup,
        "ready_s": ready_s,
        "warmup_s": core.warmup_s,
        "variants_at_ready": len(at_ready),
        "compiled_after_ready": sorted(kernel_variants() - at_ready),
        "first_ttft_ms": [1e3 * t for t in first],
        "steady_ttft_ms": [1e3 * t for t in steady],
        "worst_first_ratio": max(ratios),
        "first_over_1_5x": sum(r > 1.5 for r in ratios),
        "loaded_rate": 0.5 / mean_service,
        "loaded_p50_ms": 1e3 * p50,
        "loaded_p99_ms": 1e3 * p99,
        "loaded_p99_over_p50": p99 / p50,
    }


def ttft_alone(core, rng: random.Random, vocab: int, length: int) -> float:
    from engine.request import Request
    from engine.sampling_params import SamplingParams

    prompt = [rng.randrange(2, vocab) for _ in range(length)]
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    request = Request(f"alone-{rng.random()}", prompt, params)
    started = time.perf_counter()
    core.add_request(request)
    while core.has_work():
        core.step()
    return time.perf_counter() - started


def loaded_ttfts(core, rng: random.Random, vocab: int, rate: float) -> list[float]:
    """Poisson arrivals at `rate`/s driven into the engine's step loop; TTFT from arrival."""
    from engine.request import Request
    from engine.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    gaps = [rng.expovariate(rate) for _ in range(LOADED_REQUESTS)]
    begin = time.perf_counter()
    arrivals = [begin + sum(gaps[: i + 1]) for i in range(LOADED_REQUESTS)]
    arrived: dict[str, float] = {}
    ttft: dict[str, float] = {}
    nxt = 0
    while nxt < LOADED_REQUESTS or core.has_work():
        now = time.perf_counter()
        while nxt < LOADED_REQUESTS and arrivals[nxt] <= now:
            length = rng.randint(MEAN_PROMPT // 2, 3 * MEAN_PROMPT // 2)
            prompt = [rng.randrange(2, vocab) for _ in range(length)]
            rid = f"loaded-{nxt}"
            core.add_request(Request(rid, prompt, params))
            arrived[rid] = arrivals[nxt]
            nxt += 1
        if not core.has_work():
            time.sleep(max(0.0, min(arrivals[nxt] - time.perf_counter(), 0.01)))
            continue
        for delta in core.step():
            if delta.request_id not in ttft and delta.new_token_ids:
                ttft[delta.request_id] = time.perf_counter() - arrived[delta.request_id]
    return list(ttft.values())


def run_mode(warmup: bool) -> dict:
    """One mode in a fresh process, with a Triton cache of its own (empty: a fresh machine)."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, TRITON_CACHE_DIR=str(Path(tmp) / "triton"))
        cmd = [sys.executable, __file__, "--child", "on" if warmup else "off", "--folder", tmp]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if out.returncode != 0:
            raise RuntimeError(f"mode warmup={warmup} failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])


def print_table(results: list[dict]) -> None:
    print(
        "\n| warm-up | ready s | warm-up s | variants at ready | compiled after ready |"
        " worst first-20 TTFT / steady | first-20 over 1.5x | load req/s |"
        " TTFT p50 ms | p99 ms | p99/p50 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {'on' if r['warmup'] else 'off'} | {r['ready_s']:.1f} | {r['warmup_s']:.1f} |"
            f" {r['variants_at_ready']} | {len(r['compiled_after_ready'])} |"
            f" {r['worst_first_ratio']:.2f}x | {r['first_over_1_5x']} / {FIRST} |"
            f" {r['loaded_rate']:.1f} | {r['loaded_p50_ms']:.1f} | {r['loaded_p99_ms']:.1f} |"
            f" {r['loaded_p99_over_p50']:.2f} |"
        )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write every figure as JSON")
    parser.add_argument("--child", choices=["on", "off"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child == "on", args.folder / "model")))
        return
    results = [run_mode(False), run_mode(True)]
    print_table(results)
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
