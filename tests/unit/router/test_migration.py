"""Migration: a stream whose instance dies or fails it goes on elsewhere where it stopped.

The fakes generate output token i from its position alone (as a greedy or seeded model does),
honouring `prior_output_tokens`, so a correct continuation gives exactly the undisturbed text."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

from cluster.router.migration import continuation
from engine.sampling_params import SamplingParams
from tests.unit.router.fakes import expected_text

MAX_TOKENS = 60


def _stream(router, started: threading.Event, after: int = 10) -> list[dict | str]:
    body = {"prompt": "hi", "max_tokens": MAX_TOKENS, "stream": True, "ignore_eos": True}
    events: list[dict | str] = []
    with router.http() as http, http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                payload = line[6:]
                events.append(payload if payload == "[DONE]" else json.loads(payload))
                if len(events) >= after:
                    started.set()
    return events


def _text(events) -> str:
    return "".join(
        e["choices"][0]["text"] for e in events if isinstance(e, dict) and "choices" in e
    )


def _errors(events) -> list:
    return [e["error"] for e in events if isinstance(e, dict) and "error" in e]


def test_continuation_resends_the_released_tokens_as_prompt() -> None:
    sampling = SamplingParams(max_tokens=10, seed=3)
    rest = continuation([1, 2], sampling, [7, 8, 9])
    assert rest.prompt == [1, 2, 7, 8, 9]
    assert rest.sampling.max_tokens == 7 and rest.sampling.prior_output_tokens == 3
    assert rest.sampling.seed == 3
    again = continuation(rest.prompt, rest.sampling, [4])  # moved twice: counts add up
    assert again.prompt == [1, 2, 7, 8, 9, 4] and again.sampling.prior_output_tokens == 4
    assert continuation([1], sampling, []).sampling == sampling  # no token yet: a plain retry
    assert continuation([1], sampling, list(range(10))) is None  # nothing left to generate


def test_a_decode_instance_dying_mid_stream_moves_the_stream(start_router, pd_pair) -> None:
    router = start_router(pd_pair(decode={"step_s": 0.03}))
    prefill, decode = router.fakes
    started = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        streamed = pool.submit(_stream, router, started)
        assert started.wait(20)

        async def down() -> dict:
            return router.dispatcher.instance_down(decode.name)

        assert router.server.call(down) == {"retried": 0, "failed": 0}
        events = streamed.result(60)
    assert _errors(events) == [] and events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert _text(events) == expected_text(MAX_TOKENS)  # nothing lost, nothing repeated
    first, moved = prefill.wait_received(2)
    released = moved.sampling.prior_output_tokens
    assert 10 <= released < MAX_TOKENS
    assert moved.prompt_token_ids[: len(first.prompt_token_ids)] == first.prompt_token_ids
    assert len(moved.prompt_token_ids) == len(first.prompt_token_ids) + released
    assert moved.sampling.max_tokens == MAX_TOKENS - released
    assert decode.wait_abort(first.request_id).reason == f"{decode.name} died"
    assert router.stats()["moved_requests"] == 1
    router.assert_no_leaks()


def test_an_error_after_tokens_moves_the_stream(start_router, pd_pair) -> None:
    router = start_router(pd_pair(decode={"step_s": 0.01, "fail_at": 25}))
    started = threading.Event()
    events = _stream(router, started)
    assert _errors(events) == []
    assert _text(events) == expected_text(MAX_TOKENS)
    moved = router.fakes[0].wait_received(2)[1]
    assert moved.sampling.prior_output_tokens == 25
    router.assert_no_leaks()


def test_with_migration_off_the_client_gets_the_error(start_router, pd_pair) -> None:
    router = start_router(pd_pair(decode={"step_s": 0.01, "fail_at": 25}), migrate_on_failure=False)
    events = _stream(router, threading.Event())
    assert [e["message"] for e in _errors(events)] == [
        "instance prefill-0: request error: KV transfer failed"
    ]
    assert _text(events) == expected_text(25)
    assert len(router.fakes[0].received) == 1
    router.assert_no_leaks()


def test_a_failed_request_moves_to_another_instance(start_router, script) -> None:
    from engine.config import Role
    from tests.unit.router.fakes import FakeInstance

    decode = FakeInstance("d", Role.DECODE, script)
    broken = FakeInstance("p0", Role.PREFILL, script, decode_peer=decode, error="no messager")
    working = FakeInstance("p1", Role.PREFILL, script, decode_peer=decode, index=1)
    router = start_router([broken, working, decode])
    with router.http() as http:
        for _ in range(4):
            body = {"prompt": "hi", "max_tokens": 5, "ignore_eos": True}
            response = http.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["text"] == expected_text(5)
    assert broken.received  # some went there first, and moved on to p1 at once
    assert len(working.received) == 4
    router.assert_no_leaks()
