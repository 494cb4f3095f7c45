"""Arrival process and concurrency limit."""

from __future__ import annotations

import asyncio
import math
import time

import numpy as np
import pytest

from cluster.bench import BenchError
from cluster.bench.client import OpenAIClient, RequestRecord, build_payload
from cluster.bench.datasets import BenchRequest
from cluster.bench.runner import (
    LoadSpec,
    RunResult,
    arrival_offsets,
    arrival_schedule,
    run_load,
)
from tests.unit.bench.conftest import MODEL_ID, FakeOpenAI

REQUEST = BenchRequest("hi", None, 4, prompt_len=2)


def test_poisson_gaps_have_the_requested_mean_rate():
    offsets = np.asarray(arrival_offsets(4001, 20.0, np.random.default_rng(7)))
    gaps = np.diff(offsets)
    assert offsets[0] == 0.0 and np.all(gaps >= 0)
    # 4000 exponential gaps: the mean is within ~1.6% (1 sigma); allow 6%.
    assert gaps.mean() == pytest.approx(1 / 20.0, rel=0.06)
    # Exponential, not regular: the coefficient of variation is 1.
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.1)


def test_infinite_rate_sends_everything_at_once():
    assert arrival_offsets(5, math.inf, np.random.default_rng(0)) == [0.0] * 5


@pytest.mark.parametrize("rate", [0.0, -1.0])
def test_rate_must_be_positive(rate: float):
    with pytest.raises(BenchError):
        arrival_offsets(3, rate, np.random.default_rng(0))


async def _instant_send(index: int, request: BenchRequest, origin: float) -> RequestRecord:
    start = time.perf_counter() - origin
    return RequestRecord(index, True, "", start, 0.001, 0.001, [], None, 1)


def test_run_load_follows_the_poisson_schedule():
    load = LoadSpec(request_rate=400.0, seed=3, progress=False)
    result = asyncio.run(run_load([REQUEST] * 300, _instant_send, load))
    starts = np.asarray([r.start_s for r in result.records])
    expected = np.asarray(arrival_schedule(300, 400.0, seed=3))
    assert np.all(starts >= expected - 1e-4)
    assert np.median(starts - expected) < 0.005  # sleeps land on the schedule
    rate = (len(starts) - 1) / (starts[-1] - starts[0])
    assert rate == pytest.approx(400.0, rel=0.2)
    assert [r.prompt_tokens for r in result.records] == [2] * 300  # filled from the dataset


def test_concurrency_limit_is_respected(fake: FakeOpenAI, base_url: str):
    fake.reset(chunks=3, first_delay=0.02, delay=0.01)

    async def go() -> RunResult:
        async with OpenAIClient(base_url) as client:

            async def send(index: int, request: BenchRequest, origin: float) -> RequestRecord:
                payload = build_payload(request, "completions", MODEL_ID, 0.0, False)
                return await client.send(index, "completions", payload, origin)

            load = LoadSpec(max_concurrency=3, progress=False)
            return await run_load([REQUEST] * 12, send, load)

    result = asyncio.run(go())
    assert all(r.success for r in result.records)
    assert fake.max_active == 3  # all 12 arrive at once, so the limit is reached and held
    assert fake.active == 0
    assert len(fake.bodies) == 12


def test_without_a_limit_all_requests_run_together(fake: FakeOpenAI, base_url: str):
    fake.reset(chunks=2, first_delay=0.2, delay=0.0)

    async def go() -> RunResult:
        async with OpenAIClient(base_url) as client:

            async def send(index: int, request: BenchRequest, origin: float) -> RequestRecord:
                payload = build_payload(request, "completions", MODEL_ID, 0.0, False)
                return await client.send(index, "completions", payload, origin)

            return await run_load([REQUEST] * 8, send, LoadSpec(progress=False))

    result = asyncio.run(go())
    assert fake.max_active == 8
    assert result.duration_s < 0.2 * 8 / 2  # overlapped, not one after another
