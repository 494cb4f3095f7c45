"""PD on one GPU at the Llama-3-8B shape: KV transfer bandwidth next to the device copy
bandwidth, and how much of the transfer layer-wise streaming hides behind the prefill.

    . .devbundle/activate.sh && python3 benchmarks/gpu_pd.py [--prompt-tokens 1024 4096]

1. Ceiling: a 1 GiB device-to-device copy, as bytes moved per second (each byte read once and
   written once), measured in this run.
2. Transfer (benchmarks/pd_transfer.py, which also runs alone and on CPU): the KV of one prompt
   (32 layers, bf16) moved by the production pieces in three processes -- P's cache
   (CudaKVCache, this process), the messager's view of it over CUDA IPC registered with the
   transfer backend (a child), D's cache (another child) -- one WRITE per layer as the messager
   issues them (planned once, `write_plan` per layer), into contiguous and scattered destination
   blocks; the bytes are checked on D. Median of --iters. Each of --backends in the same run:
   nixl (UCX over CUDA IPC) and local (the messager maps D's cache too and runs one copy kernel).
3. End to end (transfer.backend: --e2e-backend): 1P1D sharing the GPU (num_gpus 0.5 each,
   random bf16 weights of the 8B shape,
   `model.load_format: random`), prompts sent one at a time: the router's TTFT split, and the
   transfer phase (first token sampled on P -> KV complete on D) as a share of the prefill,
   and its three parts. Goal: <= 10% at 4k tokens.
Prints one table; --out writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.model_folders

from benchmarks.model_folders import SHAPES, write_model_folder
from benchmarks.pd_transfer import BLOCK, copy_bandwidth, measure_transfer, patterns
from cluster.config import parse_config
from cluster.launcher import deploy

SHAPE = SHAPES["llama3-8b"]
# The transfer phase's parts (cluster/router/timings.py): P's signals reach the messager, the
# last writes finish, D takes the completion message.
TRANSFER = ("signals", "writes", "notify")


# ---------------------------------------------------------------------------- 3. end to end
def pd_config(folder: Path, max_tokens_in_prompt: int, backend: str) -> Any:
    def engine(batched: int, memory_mb: int) -> dict:
        sched = {"max_num_seqs": 8, "max_num_batched_tokens": batched, "block_size": BLOCK}
        return {"scheduler": sched, "cache": {"memory_mb": memory_mb}}

    half = {"num_cpus": 2, "num_gpus": 0.5}
    raw = {
        "model": {
            "path": str(folder),
            "device": "cuda",
            "dtype": "bfloat16",
            "load_format": "random",
        },
        "router": {"port": 0},
        "prefill": {
            "instances": 1,
            "engine": engine(max_tokens_in_prompt, 3072),
            "placement": half,
        },
        "decode": {"instances": 1, "engine": engine(512, 8192), "placement": half},
        "transfer": {"backend": backend},
        "cluster": {"startup_timeout_s": 600},
    }
    return parse_config(raw)


def one_request(url: str, model: str, prompt: list[int]) -> None:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": 4,
        "ignore_eos": True,
        "temperature": 0,
    }
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
    response.raise_for_status()


def measure_end_to_end(lengths: list[int], requests: int, backend: str) -> dict[int, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_model_folder(Path(tmp) / "llama3-8b-random", SHAPE)
        dep = deploy(pd_config(folder, max(lengths), backend))
        try:
            rng = random.Random(0)
            vocab = SHAPE["vocab_size"]
            model = httpx.get(f"{dep.url}/v1/models").json()["data"][0]["id"]
            out = {}
            for length in lengths:
                prompts = [
                    [rng.randrange(2, vocab) for _ in range(length)] for _ in range(requests + 2)
                ]
                for prompt in prompts[:2]:
                    one_request(dep.url, model, prompt)  # warm-up: kernels compile, NIXL connects
                ray.get(dep.router.reset_timings.remote())
                for prompt in prompts[2:]:
                    one_request(dep.url, model, prompt)
                stats = dep.stats()
                out[length] = {
                    "split": stats["router"]["ttft_split"],
                    "prefill_stats": stats["prefill-0"],
                }
        finally:
            dep.stop()
    return out


def print_table(copy_bw: float, transfer: dict, e2e: dict[int, dict]) -> None:
    print(f"\nGPU: {torch.cuda.get_device_name()}, Llama-3-8B shape, bf16, block {BLOCK}")
    print("| what | figure |")
    print("| --- | ---: |")
    print(f"| device copy, 1 GiB (bytes moved) | {copy_bw / 1e9:.0f} GB/s |")
    for kind, figures in transfer.items():
        mib = figures["bytes"] / 2**20
        how = {"nixl": "NIXL WRITE", "local": "local copy kernel"}[kind]
        for name in patterns(2):
            value = figures[f"{name}_bytes_per_s"]
            what = f"{how} P->D by the messager (P over CUDA IPC), {mib:.0f} MiB, {name}"
            print(f"| {what} | {value / 1e9:.0f} GB/s ({value / copy_bw:.0%} of copy) |")
    for length, data in e2e.items():
        split = data["split"]
        prefill, xfer = split["prefill"]["p50_ms"], split["transfer"]["p50_ms"]
        first = split["first_decode_step"]["p50_ms"]
        print(f"| {length}-token prompt: prefill p50 | {prefill:.1f} ms |")
        share = f"{xfer:.2f} ms ({xfer / prefill:.1%} of prefill)"
        print(f"| {length}-token prompt: prefill end -> KV complete on D, p50 | {share} |")
        parts = [split.get(f"transfer_{p}", {}).get("p50_ms", float("nan")) for p in TRANSFER]
        what = f"{length}-token prompt: of which signals / writes / notify, p50"
        print(f"| {what} | {' / '.join(f'{v:.2f}' for v in parts)} ms |")
        print(f"| {length}-token prompt: first decode step p50 | {first:.1f} ms |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--transfer-sweep", type=int, nargs="*", default=[])
    parser.add_argument(
        "--backends", nargs="+", default=["nixl", "local"], help="transfer backends to time"
    )
    parser.add_argument("--e2e-backend", default="local", help="transfer.backend end to end")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    copy_bw = copy_bandwidth()
    longest = max(args.prompt_tokens)
    transfer = {kind: measure_transfer(longest, args.iters, kind) for kind in args.backends}
    sweeps: dict[int, dict] = {}
    for length in args.transfer_sweep:  # one WRITE per layer, each of length / 16 blocks
        swept = {kind: measure_transfer(length, args.iters, kind) for kind in args.backends}
        print(f"transfer sweep {length} tokens: {swept}")
        sweeps[length] = swept
    torch.cuda.empty_cache()
    e2e = {}
    if not args.skip_e2e:
        e2e = measure_end_to_end(args.prompt_tokens, args.requests, args.e2e_backend)
    if args.out:
        data = {"copy_bytes_per_s": copy_bw, "transfer": transfer, "sweeps": sweeps}
        data["end_to_end"] = e2e
        args.out.write_text(json.dumps(data, indent=1, default=str))
    print_table(copy_bw, transfer, e2e)


if __name__ == "__main__":
    main()
