"""KV transfer between instances of different tensor-parallel sizes, over NIXL between two
processes: what routing each prefill rank's heads to the decode rank holding them costs.

A 2048-token prompt's KV in a Llama cache shape with 4 KV heads (30 layers, head_dim 64, fp32,
block_size 16: about 126 MB in all) moves from P's ranks (a source process holding P at TP a,
each rank's cache in its own shared-memory segment, as the cache messager maps them) into D's
ranks (a target process, D at TP b), one write per layer, as the messager issues it: through
its `StagedWriter` (cache_transfer/staging.py: between different sizes each D rank's heads are
gathered into a staging ring and written as whole blocks), and between different sizes also the
old way, one descriptor per (K or V, token) and route straight from P's cache ("per-token"). The
same bytes at TP 1 -> TP 1 (whole blocks merged into one run per layer) is the baseline of the
same run; an in-process memcpy of the bytes is the ceiling.

    python benchmarks/tp_transfer.py [--iters 5] [--sizes 1x1 2x1 1x2 2x2] [--staging-mb 64 4]
        [--no-per-token] [--device cuda]

`--device cuda`: every rank's cache in GPU memory (CudaKVCache on GPU 0, mapped by the target
over CUDA IPC), NIXL moving VRAM, the gather a device copy; the ceiling is a device copy.
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
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache_transfer.backend import TransferState, deadline_in
from cache_transfer.cuda_kv import CudaKVCache
from cache_transfer.factory import attach_shared_kv
from cache_transfer.layout import KVLayout
from cache_transfer.nixl_backend import NixlBackend
from cache_transfer.shared_kv import SharedKVCache
from cache_transfer.staging import StagedWriter
from cache_transfer.tp_layout import HeadRange, RankKV

KV_HEADS, LAYERS, BLOCK, HEAD_DIM, PROMPT = 4, 30, 16, 64, 2048
BLOCKS = PROMPT // BLOCK
SRC_IDS = list(range(BLOCKS))
DST_IDS = list(range(40, 40 + BLOCKS))  # contiguous on both sides: the layout is the variable
PREFIX = f"pdkv_tpx{os.getpid()}"


Cache = SharedKVCache | CudaKVCache


def rank_caches(size: int, tag: str, device: str = "cpu") -> list[Cache]:
    heads = KV_HEADS // size
    layout = KVLayout(LAYERS, BLOCKS + 80, BLOCK, heads, HEAD_DIM, 4)
    if device == "cuda":
        return [
            CudaKVCache.create(layout, torch.float32, torch.device("cuda:0")) for _ in range(size)
        ]
    return [SharedKVCache.create(f"{PREFIX}{tag}{r}", layout, "float32") for r in range(size)]


def ranks_of(caches: list[Cache]) -> list[RankKV]:
    count = caches[0].regions().layout.kv_heads
    return [RankKV(c.regions(), HeadRange(r * count, count)) for r, c in enumerate(caches)]


def run_target(handles: list[dict], conn: Connection) -> None:
    caches = [attach_shared_kv(h) for h in handles]
    backend = NixlBackend("tpx-target")
    try:
        backend.register(ranks_of(caches))
        conn.send_bytes(msgpack.packb(backend.endpoint_info()))
        conn.recv()
    finally:
        backend.close()
        for cache in caches:
            cache.close()


def time_once(backend: NixlBackend | StagedWriter, peer: str) -> tuple[float, int]:
    started = time.perf_counter()
    handles = [backend.write(peer, layer, SRC_IDS, layer, DST_IDS) for layer in range(LAYERS)]
    deadline = deadline_in(120)
    states = [backend.wait(h, deadline) for h in handles]
    seconds = time.perf_counter() - started
    descs = handles[0].num_descs
    for h in handles:
        backend.release(h)
    if any(s is not TransferState.DONE for s in states):
        raise RuntimeError("a write failed")
    return seconds, descs


def whole(caches: list[Cache], layer: int, ids: list[int]) -> torch.Tensor:
    """`[blocks, 2, BLOCK, KV_HEADS, HEAD_DIM]` of one layer, every rank's heads side by side
    (as raw 32-bit words: random bytes make NaNs, which never compare equal as floats)."""
    parts = [c.layer_tensors()[layer].view(torch.int32)[ids] for c in caches]
    return torch.cat(parts, dim=3).cpu()


def fill(caches: list[Cache], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for cache in caches:
        for layer in cache.layer_tensors():
            words = torch.randint(-(2**31), 2**31 - 1, layer.shape, generator=generator)
            layer.view(torch.int32).copy_(words.to(torch.int32))


def bench(
    p_size: int,
    d_size: int,
    iters: int,
    staging_mb: list[int],
    per_token: bool,
    device: str = "cpu",
) -> list:
    """Rows (path, descriptors per layer, median seconds) for P at TP `p_size` -> D at `d_size`;
    RuntimeError if a path's bytes arrive wrong."""
    src, dst = rank_caches(p_size, "p", device), rank_caches(d_size, "d", device)
    fill(src, p_size * 10 + d_size)
    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    child = ctx.Process(target=run_target, args=([c.handle() for c in dst], child_conn))
    child.start()
    rows = []
    try:
        if not conn.poll(60):
            raise RuntimeError("target did not start")
        info = msgpack.unpackb(conn.recv_bytes())
        with NixlBackend("tpx-source") as source:
            source.register(ranks_of(src))
            peer = source.connect(info, deadline_in(30))
            tensors = [c.layer_tensors() for c in src]
            paths: list[tuple[str, NixlBackend | StagedWriter]] = [
                (
                    f"staged, {mb} MiB ring" if p_size != d_size else "whole blocks",
                    StagedWriter(source, tensors, mb << 20),
                )
                for mb in (staging_mb if p_size != d_size else staging_mb[:1])
            ]
            if per_token and p_size != d_size:
                paths.append(("per-token", source))
            for path, writer in paths:
                for cache in dst:
                    for layer in cache.layer_tensors():
                        layer.zero_()
                time_once(writer, peer)  # warm-up: connection, page faults, staging buffer
                for layer in (0, LAYERS - 1):
                    if not torch.equal(whole(src, layer, SRC_IDS), whole(dst, layer, DST_IDS)):
                        raise RuntimeError(f"{p_size}x{d_size} {path}: layer {layer} arrived wrong")
            # Paths take turns, so a burst of load on a shared machine hits them alike.
            runs = [[time_once(writer, peer) for _, writer in paths] for _ in range(iters)]
            for i, (path, _) in enumerate(paths):
                seconds = statistics.median(turn[i][0] for turn in runs)
                rows.append((path, runs[0][i][1], seconds))
        return rows
    finally:
        conn.send("stop")
        child.join(10)
        for cache in src + dst:
            cache.close()


def memcpy_seconds(iters: int, device: str = "cpu") -> float:
    (src,), (dst,) = rank_caches(1, "m", device), rank_caches(1, "n", device)
    try:
        times = []
        for _ in range(iters + 1):
            started = time.perf_counter()
            for s, d in zip(src.layer_tensors(), dst.layer_tensors(), strict=True):
                d[40 : 40 + BLOCKS].copy_(s[:BLOCKS])
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        return statistics.median(times[1:])
    finally:
        src.close()
        dst.close()


def main() -> None:
    torch.set_num_threads(1)  # as in the messager actor (Ray gives it OMP_NUM_THREADS=1)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--sizes", nargs="+", default=["1x1", "2x1", "1x2", "2x2", "4x1"])
    parser.add_argument("--staging-mb", nargs="+", type=int, default=[64])
    parser.add_argument("--no-per-token", action="store_true", help="skip the old path's rows")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    moved = LAYERS * BLOCKS * 2 * BLOCK * KV_HEADS * HEAD_DIM * 4
    rows = [("memcpy (1 process)", "", 1, memcpy_seconds(args.iters, args.device))]
    for sizes in args.sizes:
        p_size, d_size = (int(x) for x in sizes.split("x"))
        for path, descs, seconds in bench(
            p_size, d_size, args.iters, args.staging_mb, not args.no_per_token, args.device
        ):
            rows.append((f"P TP {p_size} -> D TP {d_size}", path, descs, seconds))
    base = next((s for name, _, _, s in rows if name == "P TP 1 -> D TP 1"), None)
    load = os.getloadavg()[0]
    print(
        f"KV of a {PROMPT}-token prompt, {LAYERS} layers x {KV_HEADS} KV heads x {HEAD_DIM}, fp32,"
    )
    print(
        f"{moved / 1e6:.1f} MB on {args.device}, NIXL between two processes, one write per layer "
        f"(load {load:.1f})"
    )
    print("| sizes | path | descriptors/layer | median ms | GB/s | vs TP 1 -> 1 |")
    print("|---|---|---|---|---|---|")
    for name, path, descs, seconds in rows:
        ratio = f"{seconds / base:.2f}x" if base else "-"
        gbs = moved / seconds / 1e9
        print(f"| {name} | {path} | {descs} | {seconds * 1e3:.1f} | {gbs:.2f} | {ratio} |")


if __name__ == "__main__":
    main()
