"""Draining the router: new generation requests get 503, those in flight finish, /ready is false;
stopping ends what is still in flight with an error event, never a cut connection."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.unit.router.fakes import expected_text


def _stream_events(router, max_tokens: int, started: threading.Event) -> list[dict | str]:
    """Every SSE payload of one streamed completion (dicts, and "[DONE]")."""
    body = {"prompt": "hi", "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
    events: list[dict | str] = []
    with router.http() as http, http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                payload = line[6:]
                events.append(payload if payload == "[DONE]" else json.loads(payload))
                started.set()
    return events


def _text(events: list[dict | str]) -> str:
    return "".join(
        e["choices"][0]["text"] for e in events if isinstance(e, dict) and "choices" in e
    )


def test_drain_refuses_new_requests_and_lets_streams_finish(start_router, pd_pair) -> None:
    router = start_router(pd_pair(decode={"step_s": 0.02}))
    started = threading.Event()
    with ThreadPoolExecutor(2) as pool:
        streamed = pool.submit(_stream_events, router, 40, started)
        assert started.wait(10)
        drained = pool.submit(router.server.drain, 30.0)
        with router.http() as http:
            for _ in range(200):  # the drain flag is set on the server's loop, soon after
                refused = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
                if refused.status_code == 503:
                    break
            assert refused.status_code == 503
            assert refused.headers["Retry-After"] == "5"
            assert refused.json()["error"]["code"] == "shutting_down"
            chat = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
            assert http.post("/v1/chat/completions", json=chat).status_code == 503
            ready = http.get("/ready")
            assert ready.status_code == 503 and ready.json() == {"status": "draining"}
            assert http.get("/health").status_code == 200  # alive, just not taking work
            assert http.get("/v1/models").status_code == 200
        events = streamed.result(30)
        assert drained.result(30) == 0
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert _text(events) == expected_text(40)
    router.assert_no_leaks()


def test_stop_ends_streams_left_after_the_drain_with_an_error_event(start_router, pd_pair) -> None:
    router = start_router(pd_pair(decode={"step_s": 0.05}), max_model_len=10_000)
    started = threading.Event()
    with ThreadPoolExecutor(2) as pool:
        streamed = pool.submit(_stream_events, router, 5000, started)
        assert started.wait(10)
        assert router.server.drain(0.2) == 1  # far from done: the drain times out
        router.server.stop(reason="the server is shutting down (test)")
        events = streamed.result(30)
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert "the server is shutting down (test)" in error["message"]
    assert error["type"] == "server_error"
    assert not router.server.running
    decode = router.fakes[1]
    request_id = events[0]["id"].removeprefix("cmpl-")
    decode.wait_abort(request_id)  # the instances let go of it too


def test_stop_answers_a_waiting_non_streamed_request(start_router, pd_pair) -> None:
    router = start_router(pd_pair(decode={"step_s": 0.05}), max_model_len=10_000)
    decode = router.fakes[1]
    with ThreadPoolExecutor(1) as pool, httpx.Client(base_url=router.url, timeout=30) as http:
        body = {"prompt": "hi", "max_tokens": 5000, "ignore_eos": True}
        answer = pool.submit(http.post, "/v1/completions", json=body)
        decode.wait_received(1)
        router.server.stop(reason="stopping (test)")
        response = answer.result(30)
    assert response.status_code == 500
    assert "stopping (test)" in response.json()["error"]["message"]
