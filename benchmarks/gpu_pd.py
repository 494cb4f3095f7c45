"""PD on one GPU at the Llama-3-8B shape: KV transfer bandwidth next to the device copy
bandwidth, and how much of the transfer layer-wise streaming hides behind the prefill.

    . .devbundle/activate.sh && python3 benchmarks/gpu_pd.py [--prompt-tokens 1024 4096]

1. Ceiling: a 1 GiB device-to-device copy, as bytes moved per second (each byte read once and
   written once), measured in this run.
2. Transfer: the KV of one prompt (32 layers, bf16) moved by the production pieces in three
   processes -- P's cache (CudaKVCache, this process), the messager's view of it over CUDA IPC
   registered with the transfer backend (a child), D's cache (another child) -- one WRITE per
   layer as the messager issues them, into contiguous and scattered destination blocks; the
   bytes are checked on D. Median of --iters. Each of --backends in the same run: nixl (UCX
   over CUDA IPC) and local (the messager maps D's cache too and runs one copy kernel).
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
import multiprocessing as mp
import random
import statistics
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx
import msgpack
import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.model_folders

from benchmarks.model_folders import SHAPES, write_model_folder
from cache_transfer.backend import TransferBackend, TransferState, deadline_in
from cache_transfer.cuda_kv import CudaKVCache
from cache_transfer.factory import attach_shared_kv, make_backend, rank_kv_wire
from cache_transfer.layout import KVLayout
from cluster.config import parse_config
from cluster.launcher import deploy

SHAPE = SHAPES["llama3-8b"]
BLOCK = 16
# The transfer phase's parts (cluster/router/timings.py): P's signals reach the messager, the
# last writes finish, D takes the completion message.
TRANSFER = ("signals", "writes", "notify")


def kv_layout(prompt_tokens: int) -> KVLayout:
    return KVLayout(
        num_layers=SHAPE["num_hidden_layers"],
        num_blocks=2 * prompt_tokens // BLOCK,  # room for the scattered pattern
        block_size=BLOCK,
        kv_heads=SHAPE["num_key_value_heads"],
        head_dim=SHAPE["hidden_size"] // SHAPE["num_attention_heads"],
        itemsize=2,
    )


def patterns(prompt_blocks: int) -> dict[str, list[int]]:
    return {
        "contiguous": list(range(prompt_blocks // 2, prompt_blocks // 2 + prompt_blocks)),
        "scattered": list(range(0, 2 * prompt_blocks, 2)),  # no two destinations adjacent
    }


# ---------------------------------------------------------------------------- 1. ceiling
def copy_bandwidth() -> float:
    """Bytes moved per second by a 1 GiB device copy (median of 20, random data)."""
    src = torch.randn(2**29, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    times = []
    for _ in range(25):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return src.numel() * 2 / statistics.median(times[5:])


# ---------------------------------------------------------------------------- 2. transfer
def decode_side(kind: str, layout_wire: dict, conn: Connection) -> None:
    """D: its own cache on the GPU, registered with the backend (local: shared over CUDA IPC
    for the messager to map); answers checksum requests."""
    cache = CudaKVCache.create(KVLayout.from_wire(layout_wire), torch.bfloat16, torch.device(0))
    backend = make_backend(kind, "bench-decode", "127.0.0.1")
    backend.register(cache.regions())
    if kind == "local":
        backend.share(rank_kv_wire([cache.handle()], [(0, cache.layout.kv_heads)]))
    conn.send_bytes(msgpack.packb(backend.endpoint_info()))
    while (request := conn.recv()) != "stop":
        conn.send(checksums(cache, request))
    backend.close()
    cache.close()


def messager_side(
    kind: str, handle: dict, endpoint: bytes, prompt_blocks: int, iters: int, conn
) -> None:
    """The messager: P's cache over CUDA IPC, registered with the backend, one WRITE per
    layer."""
    cache = attach_shared_kv(handle)
    backend = make_backend(kind, "bench-messager", "127.0.0.1")
    backend.register(cache.regions())
    peer = backend.connect(msgpack.unpackb(endpoint), deadline_in(30))
    src_ids = list(range(prompt_blocks))
    layers = range(cache.layout.num_layers)
    results = {}
    for name, dst_ids in patterns(prompt_blocks).items():
        times = []
        for _ in range(iters + 2):  # two warm-ups: endpoint set-up, IPC mappings
            started = time.perf_counter()
            handles = [backend.write(peer, layer, src_ids, layer, dst_ids) for layer in layers]
            state = busy_wait(backend, handles, deadline_in(60))
            times.append(time.perf_counter() - started)
            for h in handles:
                backend.release(h)
            if state != TransferState.DONE:
                raise RuntimeError(f"transfer failed: {[h.error for h in handles if h.error]}")
        results[name] = statistics.median(times[2:])
        conn.send(("written", name))
        conn.recv()  # the owner compared the bytes
    conn.send(results)
    backend.close()
    cache.close()


def busy_wait(backend: TransferBackend, handles: list, deadline: float) -> TransferState:
    """Poll every write without sleeping (the backend's own wait sleeps up to 1 ms between
    polls, too coarse to time a few milliseconds)."""
    while True:
        states = [backend.poll(h) for h in handles]
        if all(state >= TransferState.DONE for state in states):
            return max(states)
        if time.monotonic() > deadline:
            raise TimeoutError("writes still pending")


def checksums(cache: CudaKVCache, block_ids: list[int]) -> list[int]:
    ids = torch.tensor(block_ids, device="cuda")
    return [
        int(t.index_select(0, ids).view(torch.int16).sum(dtype=torch.int64))
        for t in cache.layer_tensors()
    ]


def measure_transfer(prompt_tokens: int, iters: int, kind: str) -> dict[str, float]:
    layout = kv_layout(prompt_tokens)
    prompt_blocks = prompt_tokens // BLOCK
    owner = CudaKVCache.create(layout, torch.bfloat16, torch.device("cuda"))
    for t in owner.layer_tensors():
        t.normal_()  # never move zeros
    torch.cuda.synchronize()
    ctx = mp.get_context("spawn")
    d_conn, d_child = ctx.Pipe()
    m_conn, m_child = ctx.Pipe()
    decode = ctx.Process(target=decode_side, args=(kind, layout.to_wire(), d_child))
    decode.start()
    messager = None
    try:
        assert d_conn.poll(120), "decode side did not start"
        endpoint = d_conn.recv_bytes()
        args = (kind, owner.handle(), endpoint, prompt_blocks, iters, m_child)
        messager = ctx.Process(target=messager_side, args=args)
        messager.start()
        expected = checksums(owner, list(range(prompt_blocks)))
        for name, dst_ids in patterns(prompt_blocks).items():
            assert m_conn.poll(300), f"messager side did not finish {name}"
            assert m_conn.recv() == ("written", name)
            d_conn.send(dst_ids)
            if d_conn.recv() != expected:
                raise RuntimeError(f"{name}: D's blocks differ from P's")
            m_conn.send("checked")
        assert m_conn.poll(60)
        seconds = m_conn.recv()
    finally:
        d_conn.send("stop")
        for proc in (decode, messager):
            if proc is not None:
                proc.join(30)
    nbytes = layout.num_layers * prompt_blocks * layout.block_nbytes
    return {f"{name}_bytes_per_s": nbytes / s for name, s in seconds.items()} | {"bytes": nbytes}


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
