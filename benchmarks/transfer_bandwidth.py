"""KV transfer bandwidth between two processes: NIXL vs TCP, with raw memcpy for reference.

Moves the KV of a 2048-token prompt in SmolLM2-135M's cache shape (30 layers, 3 KV heads,
head_dim 64, fp32, block_size 16: 128 blocks of 24 KiB per layer, about 94 MB) from a source
process to a target process, one write per layer, as the cache messager does. Two destination
patterns: "contiguous" (one descriptor per layer) and "scattered" (every other block, so no run
coalesces: 128 descriptors per layer).

"nixl" is the backend as deployed (NIXL's progress thread sleeps on UCX's event fds);
"nixl-busy" is NIXL's own default, a progress thread that polls without sleeping, which pdserve
used until it was found to cost a core per idle process. Both run in one invocation, with each
side's CPU use while idle (2 s after connecting, nothing in flight) next to the timings.

    python benchmarks/transfer_bandwidth.py [--iters 10] [--backends nixl nixl-busy tcp]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache_transfer.backend import TransferBackend, TransferState, deadline_in
from cache_transfer.factory import rank_kv_wire
from cache_transfer.layout import KVLayout, paired_runs
from cache_transfer.shared_kv import SharedKVCache

LAYOUT = KVLayout(num_layers=30, num_blocks=320, block_size=16, kv_heads=3, head_dim=64, itemsize=4)
PROMPT_BLOCKS = 2048 // LAYOUT.block_size
SRC_IDS = list(range(PROMPT_BLOCKS))
IDLE_S = 2.0
BACKENDS = ("nixl", "nixl-busy", "tcp", "local")
PATTERNS = {
    "contiguous": list(range(40, 40 + PROMPT_BLOCKS)),
    "scattered": list(range(0, 2 * PROMPT_BLOCKS, 2)),
}


def create_backend(kind: str, name: str, host: str) -> TransferBackend:
    if kind == "local":
        from cache_transfer.local_backend import LocalBackend

        return LocalBackend(name)
    if kind == "tcp":
        from cache_transfer.tcp_backend import TcpBackend

        return TcpBackend(name, host=host)
    from cache_transfer.nixl_backend import PROGRESS_TIMEOUT_US, NixlBackend

    return NixlBackend(name, progress_timeout_us=0 if kind == "nixl-busy" else PROGRESS_TIMEOUT_US)


def idle_cpu_share() -> float:
    """This process's CPU use (all threads) over IDLE_S seconds of doing nothing, in cores."""
    started = time.process_time()
    time.sleep(IDLE_S)
    return (time.process_time() - started) / IDLE_S


def run_target(kind: str, host: str, cache_handle: dict[str, Any], conn: Connection) -> None:
    """Target process: attach the cache, publish the endpoint, serve until told to stop."""
    cache = SharedKVCache.attach(cache_handle)
    backend = create_backend(kind, f"bench-target-{kind}", host)
    try:
        backend.register(cache.regions())
        if kind == "local":  # the source maps this cache itself
            backend.share(rank_kv_wire([cache.handle()], [(0, cache.layout.kv_heads)]))
        conn.send_bytes(msgpack.packb(backend.endpoint_info()))
        conn.recv()  # the source has connected
        conn.send(idle_cpu_share())
        conn.recv()
    finally:
        backend.close()
        cache.close()


def time_transfer(backend: TransferBackend, peer: str, dst_ids: list[int]) -> float:
    started = time.perf_counter()
    handles = [
        backend.write(peer, layer, SRC_IDS, layer, dst_ids) for layer in range(LAYOUT.num_layers)
    ]
    deadline = deadline_in(60)
    states = [backend.wait(handle, deadline) for handle in handles]
    elapsed = time.perf_counter() - started
    for handle in handles:
        backend.release(handle)
    if any(state != TransferState.DONE for state in states):
        raise RuntimeError(f"transfer failed: {[h.error for h in handles if h.error]}")
    return elapsed


Row = tuple[str, str, int, float, str]


def bench_backend(
    kind: str, host: str, src: SharedKVCache, dst: SharedKVCache, iters: int
) -> list[Row]:
    """[(backend, pattern, descriptors per layer, median seconds, idle CPU)] for one backend."""
    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    child = ctx.Process(target=run_target, args=(kind, host, dst.handle(), child_conn))
    child.start()
    rows = []
    try:
        if not conn.poll(60):
            raise RuntimeError(f"{kind} target did not start")
        info = msgpack.unpackb(conn.recv_bytes())
        with create_backend(kind, f"bench-source-{kind}", host) as source:
            source.register(src.regions())
            peer = source.connect(info, deadline_in(30))
            conn.send("connected")
            source_idle = idle_cpu_share()
            if not conn.poll(60):
                raise RuntimeError(f"{kind} target did not report its idle CPU")
            idle = f"{source_idle:.0%} / {conn.recv():.0%}"
            for pattern, dst_ids in PATTERNS.items():
                time_transfer(source, peer, dst_ids)  # warm-up: connection, page faults
                check_copied(src, dst, dst_ids)
                times = [time_transfer(source, peer, dst_ids) for _ in range(iters)]
                descs = len(paired_runs(SRC_IDS, dst_ids))
                rows.append((kind, pattern, descs, statistics.median(times), idle))
    finally:
        conn.send("stop")
        child.join(10)
        if child.is_alive():
            child.kill()
            child.join(5)
    return rows


def check_copied(src: SharedKVCache, dst: SharedKVCache, dst_ids: list[int]) -> None:
    for layer in (0, LAYOUT.num_layers - 1):
        if not np.array_equal(src.layer_bytes(layer)[SRC_IDS], dst.layer_bytes(layer)[dst_ids]):
            raise RuntimeError(f"layer {layer}: destination differs from source")


def bench_memcpy(src: SharedKVCache, dst: SharedKVCache, iters: int) -> float:
    """Median seconds for the same bytes copied in one process, layer by layer."""
    times = []
    for _ in range(iters + 1):
        started = time.perf_counter()
        for layer in range(LAYOUT.num_layers):
            block_rows = dst.layer_bytes(layer)[40 : 40 + PROMPT_BLOCKS]
            np.copyto(block_rows, src.layer_bytes(layer)[:PROMPT_BLOCKS])
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument(
        "--backends",
        nargs="+",
        choices=BACKENDS,
        default=list(BACKENDS),
        help="nixl: as deployed; nixl-busy: NIXL's busy-polling progress thread; tcp: zmq "
        "frames; local: the source maps the target's shared cache and copies",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address the TCP target binds")
    args = parser.parse_args()

    moved = LAYOUT.num_layers * PROMPT_BLOCKS * LAYOUT.block_nbytes
    src = SharedKVCache.create("pdkv_bench_src", LAYOUT, "float32")
    dst = SharedKVCache.create("pdkv_bench_dst", LAYOUT, "float32")
    try:
        rng = np.random.default_rng(0)
        for layer in range(LAYOUT.num_layers):
            view = src.layer_bytes(layer)
            view[:] = rng.integers(0, 256, view.shape, dtype=np.uint8)
        memcpy_s = bench_memcpy(src, dst, args.iters)
        rows: list[Row] = [("memcpy (1 process)", "contiguous", 1, memcpy_s, "-")]
        for kind in args.backends:
            rows += bench_backend(kind, args.host, src, dst, args.iters)
    finally:
        src.close()
        dst.close()

    print(f"KV of a 2048-token prompt, SmolLM2-135M shape {LAYOUT.layer_shape} x 30 layers fp32")
    print(
        f"{'backend':<20} {'dst pattern':<11} {'descs/layer':>11} {'MB moved':>9} "
        f"{'median ms':>10} {'GB/s':>6} {'idle CPU src / dst':>19}"
    )
    for backend, pattern, descs, seconds, idle in rows:
        print(
            f"{backend:<20} {pattern:<11} {descs:>11} {moved / 1e6:>9.1f} "
            f"{seconds * 1e3:>10.1f} {moved / seconds / 1e9:>6.2f} {idle:>19}"
        )


if __name__ == "__main__":
    main()
