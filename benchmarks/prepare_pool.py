"""Prepare-pool throughput: 1 vs N workers when every decode instance answers its allocation
after 20 ms, and with one of two decode instances stalled (never answers).

The workers run for real (threads, zmq, the msgpack protocol) with the real D picker; the decode
instances are stand-ins that answer after a fixed delay, so the figure is the pool's own
ceiling.

    python benchmarks/prepare_pool.py
"""

from __future__ import annotations

import queue
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the decode stand-ins in tests/

from cluster.instances.decode_picker import DecodePicker
from cluster.instances.prepare_pool import Answer, Ask, PrepareWorker
from engine.protocol.splitwise import DecodeTask
from engine.sampling_params import SamplingParams
from tests.unit.cluster.standins import FakeDecode


def run(threads: int, policies: list, requests: int, timeout_s: float = 1.0) -> tuple[float, int]:
    """(requests admitted per second, requests failed). The dispatch below is P's loop's in
    miniature: an idle worker gets the next request and the D the picker chooses; a refusal or
    timeout asks the next D (3 at most)."""
    decodes = [FakeDecode(i, p, free=200 - i) for i, p in enumerate(policies)]
    inboxes = {d.name_: d.inbox.address for d in decodes}
    picker = DecodePicker([d.peer() for d in decodes], 2 * timeout_s, min(0.25, timeout_s / 4))
    answers: queue.SimpleQueue[Answer] = queue.SimpleQueue()
    workers = [PrepareWorker("127.0.0.1", answers.put, f"w{i}") for i in range(threads)]
    for worker in workers:
        worker.start()
    idle, waiting = list(workers), [f"r{i}" for i in range(requests)]
    tried: dict[str, set[str]] = {rid: set() for rid in waiting}
    admitted = failed = 0

    def ask(rid: str) -> None:
        nonlocal failed
        peer = picker.choose(1, exclude=tried[rid]) if len(tried[rid]) < 3 else None
        if peer is None:
            failed += 1
            return
        tried[rid].add(peer.name)
        worker = idle.pop()
        task = DecodeTask(rid, [1, 2, 3], SamplingParams(), [2], worker.inbox.address, "tcp://x:1")
        worker.submit(Ask(peer.name, inboxes[peer.name], task, timeout_s))

    start = time.perf_counter()
    while admitted + failed < requests:
        while idle and waiting:
            ask(waiting.pop(0))
        answer = answers.get()
        if answer.late:
            continue
        idle.append(answer.worker)
        if answer.reply is not None:
            picker.on_reply(answer.peer, answer.reply.free_blocks)
        else:
            picker.on_timeout(answer.peer)
        if answer.reply is not None and answer.reply.accepted:
            admitted += 1
        else:
            ask(answer.request_id)
    elapsed = time.perf_counter() - start
    for worker in workers:
        worker.stop()
    for d in decodes:
        d.close()
    return admitted / elapsed, failed


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
