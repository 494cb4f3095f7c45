"""Admission limits and probes with raw httpx: 429 per client, 503 when saturated, /ready,
/version."""

from __future__ import annotations

import importlib.metadata
import json
import threading
from concurrent.futures import ThreadPoolExecutor

from tests.unit.router.fakes import expected_text

COMPLETIONS = "/v1/completions"


def _error_shape(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def _post(router, headers: dict | None = None, max_tokens: int = 2) -> dict:
    with router.http() as http:
        response = http.post(
            COMPLETIONS, json={"prompt": "x", "max_tokens": max_tokens}, headers=headers or {}
        )
    assert response.status_code == 200, response.text
    return response.json()


def test_too_many_requests_from_one_client_is_429(start_router, pd_pair) -> None:
    gate = threading.Event()
    router = start_router(pd_pair(prefill={"gate": gate}), max_requests_per_client=2)
    alice = {"Authorization": "Bearer alice"}
    with ThreadPoolExecutor(3) as pool:
        held = [pool.submit(_post, router, alice), pool.submit(_post, router, alice)]
        router.fakes[0].wait_received(2)
        with router.http() as http:
            error = _error_shape(http.post(COMPLETIONS, json={"prompt": "x"}, headers=alice), 429)
            assert error["code"] == "rate_limit_exceeded" and "2 requests" in error["message"]
            limited = http.post(
                "/v1/chat/completions",
                headers=alice,
                json={"messages": [{"role": "user", "content": "x"}]},
            )
            assert limited.status_code == 429 and limited.headers["retry-after"] == "1"
            assert http.get("/v1/models", headers=alice).status_code == 200  # not counted
        # Another key, or no key (counted by address), is another client.
        others = [pool.submit(_post, router, {"Authorization": "Bearer bob"})]
        router.fakes[0].wait_received(3)
        gate.set()
        for future in held + others:
            assert future.result(10)["choices"][0]["text"] == expected_text(2)
    assert _post(router, alice)["choices"][0]["text"] == expected_text(2)  # slots came back
    router.assert_no_leaks()


def test_a_stream_holds_its_slot_until_it_ends(start_router, pd_pair) -> None:
    router = start_router(pd_pair(decode={"step_s": 0.02}), max_requests_per_client=1)
    body = {"prompt": "x", "max_tokens": 30, "stream": True}
    with router.http() as http, http.stream("POST", COMPLETIONS, json=body) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()
        assert json.loads(next(line for line in lines if line.startswith("data: "))[6:])
        _error_shape(http.post(COMPLETIONS, json={"prompt": "y"}), 429)  # by address
        assert [line for line in lines if line][-1] == "data: [DONE]"
    assert _post(router)["choices"][0]["text"] == expected_text(2)
    router.assert_no_leaks()


def test_saturated_router_is_503_with_retry_after_and_not_ready(start_router, pd_pair) -> None:
    gate = threading.Event()
    healthy = {"value": True}

    async def health() -> bool:
        return healthy["value"]

    router = start_router(pd_pair(prefill={"gate": gate}), max_inflight_requests=2, health=health)
    with router.http() as http:
        assert http.get("/ready").json() == {"status": "ready"}
        with ThreadPoolExecutor(2) as pool:
            held = pool.submit(_post, router)
            router.fakes[0].wait_received(1)
            # n=2 needs two slots and only one is left: the whole request is refused.
            response = http.post(COMPLETIONS, json={"prompt": "x", "n": 2})
            error = _error_shape(response, 503)
            assert error["code"] == "overloaded" and response.headers["retry-after"] == "1"
            assert len(router.fakes[0].received) == 1  # refused before anything was sent
            second = pool.submit(_post, router)
            router.fakes[0].wait_received(2)
            ready = http.get("/ready")
            assert ready.status_code == 503 and ready.json() == {"status": "saturated"}
            assert ready.headers["retry-after"] == "1"
            assert http.get("/health").status_code == 200  # alive and instances ready
            gate.set()
            held.result(10)
            second.result(10)
        router.assert_no_leaks()
        assert http.get("/ready").status_code == 200
        healthy["value"] = False
        assert http.get("/ready").json() == {"status": "unavailable"}
        assert http.get("/health").status_code == 503


def test_version(start_router, pd_pair) -> None:
    router = start_router(pd_pair(), api_key="k")  # no key needed, like the probes
    with router.http() as http:
        response = http.get("/version")
    assert response.status_code == 200
    assert response.json() == {"version": importlib.metadata.version("pdserve")}
