"""Prepare-pool throughput: 1 vs N threads when every decode instance answers its allocation
after 20 ms, and with one of two decode instances stalled (never answers).

The pool runs for real (threads, zmq, the msgpack protocol, the D picker); the decode instances
are stand-ins that answer after a fixed delay, so the figure is the pool's own ceiling.

    python benchmarks/prepare_pool.py
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the decode stand-ins in tests/

from cluster.config import PrefillConfig
from cluster.instances.decode_picker import DecodePicker
from cluster.instances.prepare_pool import Preparation, PreparePool
from engine.protocol.channels import SenderPool
from engine.protocol.requests import GenerateRequest
from engine.request import Request
from engine.sampling_params import SamplingParams
from tests.unit.cluster.standins import (
    FakeDecode,
    FakePrefill,
    route_replies,
)


def run(threads: int, policies: list, requests: int, timeout_s: float = 1.0) -> tuple[float, int]:
    """(requests admitted per second, requests failed)."""
    decodes = [FakeDecode(i, p, free=200 - i) for i, p in enumerate(policies)]
    prefill = FakePrefill()
    config = PrefillConfig(prepare_threads=threads, allocation_timeout_s=timeout_s)
    picker = DecodePicker(
        [d.peer() for d in decodes],
        penalty_s=2 * timeout_s,
        suspect_after_s=min(0.25, timeout_s / 4),
    )
    pool = PreparePool(config, picker, prefill.hooks(), SenderPool())
    threading.Thread(target=route_replies, args=(prefill, pool), daemon=True).start()
    start = time.perf_counter()
    for i in range(requests):
        request = Request(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=4))
        msg = GenerateRequest(
            request.request_id, [1, 2, 3], request.sampling_params, "tcp://127.0.0.1:1", 0.0
        )
        pool.submit(Preparation(msg, request))
    while len(prefill.admitted) + len(prefill.failed) < requests:
        time.sleep(0.005)
    elapsed = time.perf_counter() - start
    pool.shutdown()
    for d in decodes:
        d.close()
    prefill.inbox.close()
    return len(prefill.admitted) / elapsed, len(prefill.failed)


def main() -> None:
    cases = [
        ("1 thread, 2 Ds answering after 20 ms", 1, [0.02, 0.02], 100),
        ("4 threads, 2 Ds answering after 20 ms", 4, [0.02, 0.02], 200),
        ("1 thread, one of 2 Ds stalled", 1, ["silent", 0.02], 100),
        ("4 threads, one of 2 Ds stalled", 4, ["silent", 0.02], 200),
    ]
    print("| case | requests | prepared/s | failed |")
    print("| --- | ---: | ---: | ---: |")
    for name, threads, policies, requests in cases:
        rate, failed = run(threads, policies, requests)
        print(f"| {name} | {requests} | {rate:.1f} | {failed} |")


if __name__ == "__main__":
    main()
