"""A whole prompt's KV moved as the cache messager moves it, next to the copy ceiling measured in
the same run, and the host time its descriptors cost per layer (issue #15, item 3).

    python benchmarks/pd_transfer.py --device cpu [--prompt-tokens 4096] [--backends local nixl]
    . .devbundle/activate.sh && python3 benchmarks/pd_transfer.py --device cuda   # on a GPU

Llama-3-8B's KV shape (32 layers, 8 KV heads, head_dim 128, bf16, block 16: 64 KiB per block
and layer); destination blocks contiguous, or scattered (no two adjacent: one descriptor each).

1. Ceiling: one process copying a 1 GiB tensor (cuda: copy_, CUDA events) or 256 MiB (cpu:
   copy_, wall clock), as bytes moved per second.
2. Host planning per layer, no transfer: "before" builds every layer's descriptors as lists of
   tuples (`head_slice_descs`, then an int64 array: what the backends took until write plans);
   "after" plans the prompt once (`plan_write`) and offsets the rows per layer (`descs`).
3. Transfer in three processes: P's cache (this process), the messager (a child mapping P's
   cache: CUDA IPC or shared memory) registered with the backend, D's cache (another child).
   Every layer written, then polled until done; every byte checked on D after each mode (and
   cleared). "ids": `write` with the block ids, one per layer (descriptors planned anew each
   layer, as before write plans);
   "planned": `plan` once, `write_plan` per layer (the messager when each round brings one
   layer's signal); "layers": `plan` once, one `write_layers` for all layers (the messager when
   one round brings every layer's signal: one transfer for local and NIXL). Host issue time per
   layer is the time to issue them / 32 -- on CPU it includes the copy, which local (memmove)
   and NIXL (CMA) do inside the call. Median of --iters after two warm-ups.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

import msgpack
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.model_folders

from benchmarks.model_folders import SHAPES
from cache_transfer.backend import TransferBackend, TransferState, deadline_in
from cache_transfer.factory import attach_shared_kv, make_backend, make_shared_kv, rank_kv_wire
from cache_transfer.layout import KVLayout
from cache_transfer.tp_layout import RankKV, head_slice_descs, plan_routes

SHAPE = SHAPES["llama3-8b"]
BLOCK = 16
MODES = ("ids", "planned", "layers")


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
def copy_bandwidth(device: str = "cuda") -> float:
    """Bytes moved per second by one tensor copy_ (median of 20 after 5 warm-ups)."""
    numel = 2**29 if device == "cuda" else 2**27  # bf16: 1 GiB / 256 MiB
    src = torch.randn(numel, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    times = []
    for _ in range(25):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            started = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - started)
    return numel * 2 / statistics.median(times[5:])


# ---------------------------------------------------------------------------- 2. planning
def planning_per_layer(layout: KVLayout, dst_ids: list[int], repeats: int = 20) -> dict:
    """Median host seconds per layer to describe one prompt's blocks: before and after."""
    from cache_transfer.layout import KVRegions
    from cache_transfer.write_plan import plan_write

    addrs = [(1 << 32) + layer * layout.layer_nbytes for layer in range(layout.num_layers)]
    src = [RankKV.whole(KVRegions(layout, tuple(addrs)))]  # addresses only: never touched
    dst = [RankKV.whole(KVRegions(layout, tuple(a + (1 << 40) for a in addrs)))]
    routes = plan_routes(src, dst)
    src_ids = list(range(len(dst_ids)))

    def before() -> None:
        for layer in range(layout.num_layers):
            for route in routes:
                s, d = src[route.src_rank], dst[route.dst_rank]
                pair = head_slice_descs(
                    s.regions, s.heads, layer, src_ids, d.regions, d.heads, layer, dst_ids, s.heads
                )
                np.array(pair[0], dtype=np.int64), np.array(pair[1], dtype=np.int64)

    def after() -> None:
        plan = plan_write("d", src, dst, routes, src_ids, dst_ids)
        for layer in range(layout.num_layers):
            plan.descs(layer, layer)

    out = {}
    for name, run in (("before", before), ("after", after)):
        times = []
        for _ in range(repeats + 2):
            started = time.perf_counter()
            run()
            times.append((time.perf_counter() - started) / layout.num_layers)
        out[name] = statistics.median(times[2:])
    return out


# ---------------------------------------------------------------------------- 3. transfer
def decode_side(kind: str, device: str, layout_wire: dict, conn: Connection) -> None:
    """D: its own cache, registered with the backend (local: shared for the messager to map);
    answers checksum requests."""
    layout = KVLayout.from_wire(layout_wire)
    cache = make_shared_kv(layout, torch.bfloat16, torch.device(device), f"pdxd{os.getpid()}")
    backend = make_backend(kind, "bench-decode", "127.0.0.1")
    try:
        backend.register(cache.regions())
        if kind == "local":
            backend.share(rank_kv_wire([cache.handle()], [(0, cache.layout.kv_heads)]))
        conn.send_bytes(msgpack.packb(backend.endpoint_info()))
        while (request := conn.recv()) != "stop":
            sums = checksums(cache, request)
            for t in cache.layer_tensors():  # the next mode's writes must fill it again
                t.zero_()
            if device == "cuda":
                torch.cuda.synchronize()
            conn.send(sums)  # only now may the next writes start
    finally:
        backend.close()
        cache.close()


def messager_side(kind: str, handle: dict, endpoint: bytes, prompt_blocks: int, iters: int, conn):
    """The messager: P's cache mapped, registered with the backend, one write per layer."""
    cache = attach_shared_kv(handle)
    backend = make_backend(kind, "bench-messager", "127.0.0.1")
    backend.register(cache.regions())
    peer = backend.connect(msgpack.unpackb(endpoint), deadline_in(30))
    src_ids = list(range(prompt_blocks))
    layers = range(cache.layout.num_layers)
    results = {}
    for name, dst_ids in patterns(prompt_blocks).items():
        for mode in MODES:
            totals, issues = [], []
            for _ in range(iters + 2):  # two warm-ups: endpoint set-up, mappings
                started = time.perf_counter()
                if mode == "planned":
                    plan = backend.plan(peer, src_ids, dst_ids)
                    handles = [backend.write_plan(plan, layer, layer) for layer in layers]
                elif mode == "layers":
                    plan = backend.plan(peer, src_ids, dst_ids)
                    handles = backend.write_layers(plan, list(layers))
                else:
                    handles = [
                        backend.write(peer, layer, src_ids, layer, dst_ids) for layer in layers
                    ]
                issued = time.perf_counter()
                state = busy_wait(backend, handles, deadline_in(120))
                totals.append(time.perf_counter() - started)
                issues.append((issued - started) / len(layers))
                for h in handles:
                    backend.release(h)
                if state != TransferState.DONE:
                    raise RuntimeError(f"transfer failed: {[h.error for h in handles if h.error]}")
            results[f"{name}_{mode}"] = (
                statistics.median(totals[2:]),
                statistics.median(issues[2:]),
            )
            conn.send(("written", name, mode))
            conn.recv()  # the owner compared the bytes (and D cleared them)
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


def checksums(cache, block_ids: list[int]) -> list[int]:
    ids = torch.tensor(block_ids, device=cache.layer_tensors()[0].device)
    return [
        int(t.index_select(0, ids).view(torch.int16).sum(dtype=torch.int64))
        for t in cache.layer_tensors()
    ]


def measure_transfer(prompt_tokens: int, iters: int, kind: str, device: str = "cuda") -> dict:
    """Bytes per second for each pattern and mode (`{pattern}_bytes_per_s`: "planned", one
    write per layer), host issue seconds per layer, and the bytes moved."""
    layout = kv_layout(prompt_tokens)
    prompt_blocks = prompt_tokens // BLOCK
    owner = make_shared_kv(layout, torch.bfloat16, torch.device(device), f"pdxp{os.getpid()}")
    ctx = mp.get_context("spawn")
    d_conn, d_child = ctx.Pipe()
    m_conn, m_child = ctx.Pipe()
    decode = ctx.Process(target=decode_side, args=(kind, device, layout.to_wire(), d_child))
    messager = None
    try:
        for t in owner.layer_tensors():
            t.normal_()  # never move zeros
        if device == "cuda":
            torch.cuda.synchronize()
        decode.start()
        assert d_conn.poll(120), "decode side did not start"
        endpoint = d_conn.recv_bytes()
        args = (kind, owner.handle(), endpoint, prompt_blocks, iters, m_child)
        messager = ctx.Process(target=messager_side, args=args)
        messager.start()
        expected = checksums(owner, list(range(prompt_blocks)))
        for name, dst_ids in patterns(prompt_blocks).items():
            for mode in MODES:  # each mode's bytes checked, then cleared on D
                assert m_conn.poll(600), f"messager side did not finish {name} ({mode})"
                assert m_conn.recv() == ("written", name, mode)
                d_conn.send(dst_ids)
                if d_conn.recv() != expected:
                    raise RuntimeError(f"{name} ({mode}): D's blocks differ from P's")
                m_conn.send("checked")
        assert m_conn.poll(60)
        timings = m_conn.recv()
    finally:
        if decode.is_alive():
            d_conn.send("stop")
        for proc in (decode, messager):
            if proc is not None:
                proc.join(30)
                if proc.is_alive():  # stuck after a failure: never wait on it at exit
                    proc.kill()
                    proc.join(5)
        owner.close()
    nbytes = layout.num_layers * prompt_blocks * layout.block_nbytes
    out: dict = {"bytes": nbytes}
    for key, (seconds, issue) in timings.items():
        out[f"{key}_bytes_per_s"] = nbytes / seconds
        out[f"{key}_issue_s_per_layer"] = issue
    for name in patterns(2):
        out[f"{name}_bytes_per_s"] = out[f"{name}_planned_bytes_per_s"]
    return out


def print_table(device: str, tokens: int, copy_bw: float, planning: dict, transfer: dict) -> None:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    what = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    mib = kv_layout(tokens).num_layers * tokens // BLOCK * kv_layout(tokens).block_nbytes / 2**20
    print(f"\n{what}; a {tokens}-token prompt, Llama-3-8B KV shape, bf16, block {BLOCK}, ")
    print(f"{mib:.0f} MiB, one write per layer; load average {load}")
    print("| what | contiguous | scattered |")
    print("| --- | ---: | ---: |")
    print(f"| copy_ in one process (ceiling) | {copy_bw / 1e9:.1f} GB/s | |")
    for name, label in (("before", "tuple lists per layer"), ("after", "planned once, offset")):
        row = [f"{planning[p][name] * 1e6:.1f} us" for p in ("contiguous", "scattered")]
        print(f"| host planning per layer, {name}: {label} | {' | '.join(row)} |")
    for kind, figures in transfer.items():
        for mode in MODES:
            issue = [
                f"{figures[f'{p}_{mode}_issue_s_per_layer'] * 1e6:.0f} us" for p in patterns(2)
            ]
            rate = [figures[f"{p}_{mode}_bytes_per_s"] for p in patterns(2)]
            rates = [f"{r / 1e9:.1f} GB/s ({r / copy_bw:.0%})" for r in rate]
            print(f"| {kind}, {mode}: host issue per layer | {' | '.join(issue)} |")
            print(f"| {kind}, {mode}: whole prompt (of copy) | {' | '.join(rates)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--prompt-tokens", type=int, default=4096)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--backends", nargs="+", default=["local", "nixl"])
    parser.add_argument("--planning-only", action="store_true", help="no ceiling, no transfer")
    args = parser.parse_args()
    layout = kv_layout(args.prompt_tokens)
    blocks = args.prompt_tokens // BLOCK
    planning = {name: planning_per_layer(layout, ids) for name, ids in patterns(blocks).items()}
    if args.planning_only:
        args.backends = []
    copy_bw = float("nan") if args.planning_only else copy_bandwidth(args.device)
    transfer = {
        kind: measure_transfer(args.prompt_tokens, args.iters, kind, args.device)
        for kind in args.backends
    }
    print_table(args.device, args.prompt_tokens, copy_bw, planning, transfer)


if __name__ == "__main__":
    main()
