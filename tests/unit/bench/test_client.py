"""The streaming client against the fake server: timings, token counts, failures."""

from __future__ import annotations

import asyncio
import statistics
import time

import pytest

from cluster.bench.client import (
    OpenAIClient,
    RequestRecord,
    StreamError,
    build_payload,
    normalize_base_url,
    parse_sse_line,
)
from cluster.bench.datasets import BenchRequest, Endpoint
from tests.unit.bench.conftest import MODEL_ID, FakeOpenAI

# Loose: the machine is shared and has two cores; the delays themselves are tens of ms.
SLACK_S = 0.04


def _send(
    base_url: str,
    endpoint: Endpoint = "completions",
    timeout: float = 10.0,
    request: BenchRequest | None = None,
) -> RequestRecord:
    request = request or BenchRequest("hello", None, 5)
    if endpoint == "chat":
        request = BenchRequest(None, [{"role": "user", "content": "hello"}], 5)

    async def go() -> RequestRecord:
        async with OpenAIClient(base_url, timeout=timeout) as client:
            payload = build_payload(request, endpoint, MODEL_ID, 0.0, ignore_eos=True)
            return await client.send(0, endpoint, payload, time.perf_counter())

    return asyncio.run(go())


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_timings_match_injected_delays(fake: FakeOpenAI, base_url: str, endpoint: Endpoint):
    fake.reset(chunks=6, first_delay=0.08, delay=0.03)
    record = _send(base_url, endpoint)
    assert record.success, record.error
    # Injected delays are lower bounds; a loaded machine (or a cold first request) only adds to
    # them, so no upper bound: what is checked is that each measure is the right interval.
    assert record.ttft_s >= 0.08
    assert len(record.itl_s) == 5
    assert statistics.median(record.itl_s) >= 0.03 - 0.005
    assert record.output_tokens == 6 and record.usage_reported
    assert record.prompt_tokens == 7
    assert record.tpot_s == pytest.approx((record.e2e_s - record.ttft_s) / 5)
    assert record.e2e_s >= record.ttft_s + sum(record.itl_s) - 1e-6


def test_request_body_asks_for_usage_and_streaming(fake: FakeOpenAI, base_url: str):
    _send(base_url)
    (body,) = fake.bodies
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["model"] == MODEL_ID and body["max_tokens"] == 5
    assert body["ignore_eos"] is True and body["temperature"] == 0.0


def test_token_count_uses_usage_when_chunks_hold_several_tokens(fake: FakeOpenAI, base_url: str):
    fake.reset(chunks=4, first_delay=0.0, delay=0.03, tokens_per_chunk=3)
    record = _send(base_url)
    assert record.output_tokens == 12 and record.usage_reported
    # 3 gaps of at least 30 ms spread over the 11 tokens after the first (not 3 chunks)
    assert record.tpot_s == pytest.approx((record.e2e_s - record.ttft_s) / 11)
    assert record.tpot_s >= 0.09 / 11 - 0.001


def test_token_count_falls_back_to_chunks_without_usage(fake: FakeOpenAI, base_url: str):
    fake.reset(chunks=4, first_delay=0.0, delay=0.0, tokens_per_chunk=3, send_usage=False)
    record = _send(base_url)
    assert record.success
    assert record.output_tokens == 4 and not record.usage_reported
    assert record.prompt_tokens is None


def test_http_error_is_recorded_with_its_message(fake: FakeOpenAI, base_url: str):
    fake.reset(fail_every=1)
    record = _send(base_url)
    assert not record.success
    assert record.error == "HTTP 500: injected failure"


def test_error_inside_the_stream_fails_the_request(fake: FakeOpenAI, base_url: str):
    fake.reset(fail_every=1, fail_in_stream=True)
    record = _send(base_url)
    assert not record.success
    assert "injected stream failure" in record.error


def test_timeout_fails_the_request(fake: FakeOpenAI, base_url: str):
    fake.reset(chunks=2, first_delay=1.0)
    record = _send(base_url, timeout=0.2)
    assert not record.success
    assert record.error == "timed out after 0.2 s"


def test_unreachable_server_is_a_failed_record():
    record = _send("http://127.0.0.1:9", timeout=2.0)  # port 9: discard, nothing listens
    assert not record.success
    assert record.error.startswith("ConnectError")


def test_first_model(base_url: str):
    async def go() -> str:
        async with OpenAIClient(base_url + "/v1/") as client:
            return await client.first_model()

    assert asyncio.run(go()) == MODEL_ID


def test_parse_sse_line():
    assert parse_sse_line("") is None
    assert parse_sse_line(": keep-alive") is None
    assert parse_sse_line("data: [DONE]") == "[DONE]"
    assert parse_sse_line('data:{"choices": []}') == {"choices": []}
    with pytest.raises(StreamError, match="boom"):
        parse_sse_line('data: {"error": {"message": "boom"}}')
    with pytest.raises(StreamError, match="malformed"):
        parse_sse_line("data: {not json")


def test_build_payload_leaves_out_ignore_eos_unless_asked():
    body = build_payload(BenchRequest([1, 2, 3], None, None), "completions", "m", 0.5, False)
    assert body == {
        "model": "m",
        "prompt": [1, 2, 3],
        "temperature": 0.5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def test_normalize_base_url():
    for url in ("http://h:1", "http://h:1/", "http://h:1/v1", "http://h:1/v1/"):
        assert normalize_base_url(url) == "http://h:1"


def test_record_round_trips_through_dict():
    record = RequestRecord(3, True, "", 0.5, 0.1, 0.4, [0.1, 0.1, 0.1], 9, 4, True, 4)
    data = record.to_dict()
    assert data["tpot_s"] == pytest.approx(0.1)
    assert RequestRecord.from_dict(data) == record
    assert record.chunk_times_s() == pytest.approx([0.6, 0.7, 0.8, 0.9])
