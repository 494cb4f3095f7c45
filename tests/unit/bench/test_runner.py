"""Arrival process and concurrency limit."""

from __future__ import annotations

import asyncio
import math

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


class VirtualClock:
    """Time that moves only when the runner sleeps, so the schedule is checked exactly."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        await asyncio.sleep(0)  # tasks already due run first, at the current time
        self.now += seconds


def test_run_load_follows_the_poisson_schedule():
    clock = VirtualClock()

    async def instant_send(index: int, request: BenchRequest, origin: float) -> RequestRecord:
        return RequestRecord(index, True, "", clock() - origin, 0.001, 0.001, [], None, 1)

    load = LoadSpec(request_rate=400.0, seed=3, progress=False)
    result = asyncio.run(
        run_load([REQUEST] * 300, instant_send, load, clock=clock, sleep=clock.sleep)
    )
    starts = np.asarray([r.start_s for r in result.records])
    expected = np.asarray(arrival_schedule(300, 400.0, seed=3))
    # Each request is sent at its own arrival time, slept to on absolute times.
    np.testing.assert_allclose(starts, expected, rtol=0, atol=1e-9)
    assert len(clock.sleeps) == np.count_nonzero(np.diff(expected) > 0)
    rate = (len(starts) - 1) / (starts[-1] - starts[0])
    assert rate == pytest.approx(400.0, rel=0.2)
    assert [r.prompt_tokens for r in result.records] == [2] * 300  # filled from the dataset


def test_a_late_loop_does_not_stretch_the_schedule():
    """Sleeps overshoot by 3 ms each: later sleeps shrink, so arrivals never drift further."""
    clock = VirtualClock()

    async def late_sleep(seconds: float) -> None:
        await clock.sleep(seconds + 0.003)

    async def instant_send(index: int, request: BenchRequest, origin: float) -> RequestRecord:
        return RequestRecord(index, True, "", clock() - origin, 0.001, 0.001, [], None, 1)

    load = LoadSpec(request_rate=50.0, seed=5, progress=False)
    result = asyncio.run(
        run_load([REQUEST] * 100, instant_send, load, clock=clock, sleep=late_sleep)
    )
    lateness = np.asarray([r.start_s for r in result.records]) - arrival_schedule(100, 50.0, seed=5)
    assert lateness.min() >= 0 and lateness.max() <= 0.003 + 1e-9


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
    assert result.duration_s < 0.2 * 8  # overlapped: one after another would take 1.6 s
