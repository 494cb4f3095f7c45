"""Drive the workload: when each request is sent and how many may be in flight.

Arrivals follow the schedule fixed up front (Poisson: exponential gaps at `request_rate`;
inf: all at time 0) and are slept to on absolute times, so a slow event loop does not stretch
the schedule. With `max_concurrency`, an arrived request waits for a free slot; its timings
start when it is actually sent, as in vLLM's benchmark_serving, so client-side queueing shows
up as lower throughput rather than as higher TTFT.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from cluster.bench import BenchError
from cluster.bench.client import RequestRecord
from cluster.bench.datasets import BenchRequest

# (index, request, origin on perf_counter) -> the finished record; never raises per request.
SendFn = Callable[[int, BenchRequest, float], Awaitable[RequestRecord]]


@dataclass(frozen=True)
class LoadSpec:
    request_rate: float = math.inf  # requests per second; inf sends everything at once
    max_concurrency: int | None = None
    seed: int = 0
    progress: bool = True


@dataclass
class RunResult:
    records: list[RequestRecord]
    duration_s: float  # first send scheduled -> last request finished


def arrival_offsets(count: int, request_rate: float, rng: np.random.Generator) -> list[float]:
    """Send times in seconds from the start: the first at 0, then exponential gaps."""
    if not request_rate > 0:
        raise BenchError(f"--request-rate must be positive (or inf), got {request_rate}")
    if math.isinf(request_rate) or count == 0:
        return [0.0] * count
    gaps = rng.exponential(1.0 / request_rate, size=count - 1)
    return [0.0, *np.cumsum(gaps).tolist()]


class _NoProgress:
    """Stands in for tqdm when it is not installed and --no-progress was given."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs: object) -> None:
        pass

    def close(self) -> None:
        pass


def arrival_schedule(count: int, request_rate: float, seed: int) -> list[float]:
    # A random stream of its own, so changing dataset options does not move the arrival times.
    return arrival_offsets(count, request_rate, np.random.default_rng([seed, 1]))


def _progress_bar(total: int, enabled: bool) -> Any:
    try:
        from tqdm import tqdm
    except ImportError as exc:
        if enabled:
            raise BenchError("the progress bar needs tqdm: pip install 'pdserve[bench]'") from exc
        return _NoProgress()
    return tqdm(
        total=total,
        file=sys.stderr,
        disable=not enabled,
        unit="req",
        desc="bench",
        dynamic_ncols=True,
    )


async def run_load(
    requests: list[BenchRequest],
    send: SendFn,
    load: LoadSpec,
    *,
    clock: Callable[[], float] = time.perf_counter,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> RunResult:
    """Send each request at its scheduled time; `clock` and `sleep` are swappable for tests."""
    if load.max_concurrency is not None and load.max_concurrency < 1:
        raise BenchError(f"--max-concurrency must be at least 1, got {load.max_concurrency}")
    offsets = arrival_schedule(len(requests), load.request_rate, load.seed)
    slots = asyncio.Semaphore(load.max_concurrency) if load.max_concurrency else None
    bar = _progress_bar(len(requests), load.progress)
    failed = 0
    origin = clock()

    async def one(index: int, request: BenchRequest) -> RequestRecord:
        nonlocal failed
        if slots is None:
            record = await send(index, request, origin)
        else:
            async with slots:
                record = await send(index, request, origin)
        if record.prompt_tokens is None:
            record.prompt_tokens = request.prompt_len
        if not record.success:
            failed += 1
            bar.set_postfix(failed=failed, refresh=False)
        bar.update(1)
        return record

    tasks = []
    try:
        for index, (request, offset) in enumerate(zip(requests, offsets, strict=True)):
            delay = origin + offset - clock()
            if delay > 0:
                await sleep(delay)
            tasks.append(asyncio.create_task(one(index, request)))
        records = list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()  # a no-op for finished tasks; stops the rest on Ctrl-C
        bar.close()
    return RunResult(records, clock() - origin)
