"""Cache-aware against load-only routing on multi-turn chat, Llama-3-8B shape, a GPU per instance.

    . .devbundle/activate.sh && python3 benchmarks/gpu_cache_routing.py [--users 32 --turns 6]

Workload (cluster/bench/multiturn.py): --users conversations share a --system-prompt-len-token
system prompt; each turn adds a --turn-len-token user message and is sent when the previous
answer (--output-len tokens, EOS ignored) has arrived, with that answer appended. Random bf16
weights of the 8B shape (`model.load_format: random`), a word-level tokenizer (one token per
word), completions endpoint. Topologies, each instance on its own GPU:
- 1p1d: one prefill and one decode instance. Load-only routing moves every prompt's whole KV
  from P to D; cache-aware routing lets D keep each conversation's KV, so only new tokens move.
- mixed2: two mixed instances. Load-only routing sends a conversation's turns to either
  instance; cache-aware sends each turn where its prefix is, under the balance guard.
Each (topology, routing) runs on a fresh deployment (empty caches), the same workload, after a
warm-up on unrelated prompts. Prints one table: KV bytes moved and skipped per request, TTFT
p50 from the third turn on, TTFT/TPOT p50 overall, goodput under the SLO; --out writes JSON.
Both routing modes of a topology run in this one invocation, so they share the machine state.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.model_folders

from benchmarks.model_folders import SHAPES, write_model_folder
from cluster.bench.client import OpenAIClient, build_payload
from cluster.bench.multiturn import FROM_TURN, ConversationRun, MultiturnSpec, run_conversations
from cluster.bench.report import latency_stats_ms, summarize
from cluster.bench.runner import LoadSpec
from cluster.config import parse_config
from cluster.launcher import deploy

BLOCK = 16
TOPOLOGIES = ("1p1d", "mixed2")
ROUTINGS = ("load", "cache_aware")


def config(folder: Path, topology: str, routing: str, args: argparse.Namespace) -> Any:
    engine = {
        "scheduler": {"max_num_seqs": 64, "max_num_batched_tokens": 2048, "block_size": BLOCK},
        "cache": {"memory_mb": args.memory_mb},
    }
    on_gpu = args.device == "cuda"
    gpu = {"num_cpus": 2 if on_gpu else 0.5, "num_gpus": 1 if on_gpu else 0}
    raw: dict[str, Any] = {
        "model": {
            "path": str(folder),
            "device": args.device,
            "dtype": "bfloat16" if on_gpu else "float32",
            "load_format": "random",
        },
        "router": {"port": 0, "routing": routing},
        "transfer": {"backend": "nixl"},
        "cluster": {"startup_timeout_s": 900},
    }
    if topology == "1p1d":
        raw["prefill"] = {"instances": 1, "engine": engine, "placement": gpu}
        raw["decode"] = {"instances": 1, "engine": engine, "placement": gpu}
    else:
        raw["prefill"] = {"instances": 0}
        raw["decode"] = {"instances": 0}
        raw["mixed"] = {"instances": 2, "engine": engine, "placement": gpu}
    return parse_config(raw)


def warm_up(url: str, model: str, count: int, vocab_size: int) -> None:
    """Compile kernels, capture graphs and connect NIXL on prompts no conversation shares."""
    rng = random.Random(12345)
    for length in [64, 512, 2048][:count] + [256] * max(count - 3, 0):
        prompt = [rng.randrange(2, vocab_size) for _ in range(length)]
        body = {"model": model, "prompt": prompt, "max_tokens": 8, "ignore_eos": True}
        httpx.post(f"{url}/v1/completions", json=body, timeout=600).raise_for_status()


async def converse(url: str, model: str, spec: MultiturnSpec) -> ConversationRun:
    async with OpenAIClient(url, timeout=600) as client:

        async def send(index, request, origin):
            payload = build_payload(request, spec.endpoint, model, 0.0, ignore_eos=True)
            return await client.send(index, spec.endpoint, payload, origin)

        return await run_conversations(spec, send, LoadSpec(progress=False))


def kv_bytes(stats: dict) -> tuple[int, int]:
    """KV bytes every prefill instance moved to decode instances, and skipped."""
    moved = skipped = 0
    for name, entry in stats.items():
        counters = entry.get("counters", {}) if name.startswith("prefill") else {}
        moved += counters.get("transfer_bytes", 0)
        skipped += counters.get("transfer_bytes_skipped", 0)
    return moved, skipped


def run_case(folder: Path, topology: str, routing: str, spec: MultiturnSpec, args) -> dict:
    dep = deploy(config(folder, topology, routing, args))
    try:
        model = httpx.get(f"{dep.url}/v1/models").json()["data"][0]["id"]
        warm_up(dep.url, model, args.warmup, SHAPES[args.shape]["vocab_size"])
        moved0, skipped0 = kv_bytes(dep.stats())
        ray.get(dep.router.reset_timings.remote())
        started = time.perf_counter()
        run = asyncio.run(converse(dep.url, model, spec))
        duration = time.perf_counter() - started
        stats = dep.stats()
    finally:
        dep.stop()
    moved, skipped = kv_bytes(stats)
    ok = [r for r in run.records if r.success]
    later = [r.ttft_s for r, t in zip(run.records, run.turns, strict=True) if t >= FROM_TURN]
    slo = {"ttft": args.slo_ttft_ms, "tpot": args.slo_tpot_ms}
    summary = summarize(run.records, duration, slo)
    return {
        "topology": topology,
        "routing": routing,
        "requests": len(run.records),
        "ok": len(ok),
        "kv_moved_per_request": (moved - moved0) / max(len(ok), 1),
        "kv_skipped_per_request": (skipped - skipped0) / max(len(ok), 1),
        "ttft_p50_from_turn3_ms": latency_stats_ms([t for t in later if t is not None])["median"],
        "ttft_p50_ms": summary.latency_ms["ttft"]["median"],
        "tpot_p50_ms": summary.latency_ms["tpot"]["median"],
        "goodput_rps": summary.goodput,
        "slo_attainment": summary.slo_attainment,
        "duration_s": duration,
        "routing_stats": stats["router"].get("routing", {}),
        "ttft_split": stats["router"].get("ttft_split", {}),
        "errors": summary.errors,
    }


def print_table(rows: list[dict], spec: MultiturnSpec, args) -> None:
    print(
        f"\n{args.shape} shape on {args.device}, random weights; "
        f"{spec.users} users x {spec.turns} turns, "
        f"system prompt {spec.system_prompt_len}, turns {spec.turn_len}, answers "
        f"{spec.output_len} tokens; SLO TTFT {args.slo_ttft_ms:g} ms, TPOT {args.slo_tpot_ms:g} ms"
    )
    print(
        "| topology | routing | ok/sent | KV moved MB/req | KV skipped MB/req | "
        f"TTFT p50 turn>={FROM_TURN} ms | TTFT p50 ms | TPOT p50 ms | goodput req/s | SLO met |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        cells = [
            r["topology"],
            r["routing"],
            f"{r['ok']}/{r['requests']}",
            f"{r['kv_moved_per_request'] / 1e6:.1f}",
            f"{r['kv_skipped_per_request'] / 1e6:.1f}",
            _ms(r["ttft_p50_from_turn3_ms"]),
            _ms(r["ttft_p50_ms"]),
            _ms(r["tpot_p50_ms"]),
            f"{r['goodput_rps']:.2f}",
            f"{r['slo_attainment']:.0%}",
        ]
        print("| " + " | ".join(cells) + " |")
    for topology in dict.fromkeys(r["topology"] for r in rows):
        by = {r["routing"]: r for r in rows if r["topology"] == topology}
        if set(by) == set(ROUTINGS):
            base, cache = by["load"], by["cache_aware"]
            print(
                f"{topology}: cache-aware vs load-only: KV moved per request "
                f"{_change(base['kv_moved_per_request'], cache['kv_moved_per_request'])}, "
                f"TTFT p50 from turn {FROM_TURN} "
                f"{_change(base['ttft_p50_from_turn3_ms'], cache['ttft_p50_from_turn3_ms'])}"
            )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _change(before: float | None, after: float | None) -> str:
    if not before or after is None:
        return "-"
    return f"{(after - before) / before:+.0%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topologies", nargs="+", choices=TOPOLOGIES, default=list(TOPOLOGIES))
    parser.add_argument("--routings", nargs="+", choices=ROUTINGS, default=list(ROUTINGS))
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--system-prompt-len", type=int, default=1024)
    parser.add_argument("--turn-len", type=int, default=200)
    parser.add_argument("--output-len", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=6, help="warm-up requests per deployment")
    parser.add_argument("--memory-mb", type=int, default=40_000, help="KV cache per instance")
    parser.add_argument("--slo-ttft-ms", type=float, default=300.0)
    parser.add_argument("--slo-tpot-ms", type=float, default=12.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--shape", choices=sorted(SHAPES), default="llama3-8b", help="model shape (random weights)"
    )
    parser.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a smoke run of the plumbing"
    )
    args = parser.parse_args()
    vocabulary = tuple(f"w{i}" for i in range(2, SHAPES[args.shape]["vocab_size"]))
    spec = MultiturnSpec(
        users=args.users,
        turns=args.turns,
        system_prompt_len=args.system_prompt_len,
        turn_len=args.turn_len,
        output_len=args.output_len,
        endpoint="completions",
        seed=args.seed,
        vocabulary=vocabulary,
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_model_folder(Path(tmp) / f"{args.shape}-random", SHAPES[args.shape])
        for topology in args.topologies:
            for routing in args.routings:
                rows.append(run_case(folder, topology, routing, spec, args))
                print(json.dumps({k: rows[-1][k] for k in list(rows[-1])[:11]}), flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1, default=str))
    print_table(rows, spec, args)


if __name__ == "__main__":
    main()
