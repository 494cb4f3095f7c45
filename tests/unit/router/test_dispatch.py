"""Instance choice, deadlines, disconnects and failures: what reaches the instances, and that
the router keeps no state for requests that ended."""

from __future__ import annotations

import contextlib
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx

from engine.config import Role
from engine.protocol.tokens import TokenItem
from tests.unit.router.fakes import FakeInstance, expected_text


def _post(router, prompt: str, max_tokens: int = 2) -> dict:
    with router.http() as http:
        response = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens})
    assert response.status_code == 200, response.text
    return response.json()


def test_choice_by_outstanding_prefill_tokens(start_router, script) -> None:
    # Both prefill instances hold their first tokens until the test opens their gates, so the
    # outstanding prompt tokens add up and decide where each request goes.
    gates = {"p0": threading.Event(), "p1": threading.Event()}
    decode = FakeInstance("d", Role.DECODE, script)
    p0 = FakeInstance("p0", Role.PREFILL, script, decode_peer=decode, gate=gates["p0"])
    p1 = FakeInstance("p1", Role.PREFILL, script, decode_peer=decode, gate=gates["p1"], index=1)
    router = start_router([p0, p1, decode])
    prompts = ["a" * 49, "b" * 9, "c" * 9, "d" * 34, "e" * 4]  # 50, 10, 10, 35, 5 tokens
    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = []
        for count, prompt in enumerate(prompts, start=1):
            futures.append(pool.submit(_post, router, prompt))
            # One at a time, so each choice sees the previous ones' outstanding tokens.
            _wait_total(p0, p1, count)
        big, small = (p0, p1) if len(p0.received[0].prompt_token_ids) == 50 else (p1, p0)
        # 50 on one; 10, 10, 35 go to the other (10 < 50, 20 < 50, 20 + 35 = 55 > 50 after).
        assert [len(r.prompt_token_ids) for r in big.received] == [50, 5]
        assert [len(r.prompt_token_ids) for r in small.received] == [10, 10, 35]
        assert router.stats()["outstanding_prefill_tokens"] == {
            str(big.name): 55,
            str(small.name): 55,
        }
        gates[small.label].set()  # the fast one answers; the slow one still holds 55
        for future in futures[1:4]:
            assert future.result(10)["choices"][0]["text"] == expected_text(2)
        assert router.stats()["outstanding_prefill_tokens"] == {
            str(big.name): 55,
            str(small.name): 0,
        }
        _post(router, "f" * 99)  # 100 tokens: the fast instance still has fewer
        assert len(small.received) == 4
        gates[big.label].set()
        assert futures[0].result(10)["usage"]["completion_tokens"] == 2
    router.assert_no_leaks()


def _wait_total(p0: FakeInstance, p1: FakeInstance, total: int) -> None:
    # Each fake records under its own condition; wait on both until the sum is reached.
    for _ in range(500):
        if len(p0.received) + len(p1.received) >= total:
            return
        for fake in (p0, p1):
            with fake._changed:
                fake._changed.wait(0.01)
    raise AssertionError(f"{total} requests did not reach the instances")


def test_client_disconnect_mid_stream_aborts_everywhere(start_router, pd_pair) -> None:
    router = start_router(pd_pair(decode={"step_s": 0.02}))
    body = {"prompt": "hi", "max_tokens": 200, "stream": True, "ignore_eos": True}
    with router.http() as http, http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        first = json.loads(next(line for line in lines if line.startswith("data: "))[6:])
        next(lines)
        request_id = first["id"].removeprefix("cmpl-")
        assert router.stats()["inflight_requests"] == 1
    # The client closed the connection: P and its D hear of it, the router forgets it.
    for fake in router.fakes:
        assert fake.wait_abort(request_id).request_id == request_id
    router.assert_no_leaks()
    assert not router.fakes[1].active_ids


def test_client_disconnect_before_first_token(start_router, script) -> None:
    gate = threading.Event()
    fake = FakeInstance("p", Role.PREFILL, script, gate=gate)  # the gate stays closed
    router = start_router([fake])
    with router.http() as http:
        sent = threading.Thread(target=_send_and_give_up, args=(http,))
        sent.start()
        fake.wait_received(1)
        sent.join(10)
    request_id = fake.received[0].request_id
    assert fake.wait_abort(request_id).reason == "client disconnected"
    router.assert_no_leaks()


def _send_and_give_up(http) -> None:
    # The read timeout is the point: the client gives up and disconnects.
    with contextlib.suppress(httpx.TimeoutException):
        http.post("/v1/completions", json={"prompt": "x", "max_tokens": 3}, timeout=0.5)


def test_first_token_timeout(start_router, pd_pair) -> None:
    fakes = pd_pair(prefill={"gate": threading.Event()})  # never opened
    router = start_router(fakes, first_token_timeout_s=0.3)
    with router.http() as http:
        response = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 3})
        streamed = http.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "x"}], "stream": True},
        )
    for result in (response, streamed):
        assert result.status_code == 504
        error = result.json()["error"]
        assert "first token" in error["message"] and error["type"] == "server_error"
    for request in fakes[0].wait_received(2):
        # Only P holds it: the router heard of no D (P cancels a D it chose itself).
        assert fakes[0].wait_abort(request.request_id).reason.startswith("timeout")
    stats = router.wait_idle()
    assert fakes[1].aborts == []
    assert stats["timeouts"] == 2
    router.assert_no_leaks()


def test_next_token_timeout_mid_stream(start_router, pd_pair) -> None:
    # The decode fake never gets the request (no peer), so only the first token arrives.
    fakes = pd_pair()
    fakes[0]._peer = None
    router = start_router(fakes, next_token_timeout_s=0.3)
    with router.http() as http:
        response = http.post(
            "/v1/completions", json={"prompt": "x", "max_tokens": 4, "stream": True}
        )
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert response.status_code == 200  # the first text went out before the deadline
    assert json.loads(events[0])["choices"][0]["text"] == expected_text(1)
    assert "next token" in json.loads(events[-2])["error"]["message"]
    assert events[-1] == "[DONE]"
    router.assert_no_leaks()


def test_instance_error_is_a_clean_500(start_router, script) -> None:
    router = start_router([FakeInstance("m", Role.MIXED, script, error="out of KV blocks")])
    with router.http() as http:
        response = http.post("/v1/completions", json={"prompt": "x"})
    assert response.status_code == 500
    error = response.json()["error"]
    assert "out of KV blocks" in error["message"] and error["code"] == "instance_error"
    assert set(error) == {"message", "type", "param", "code"}
    request_id = router.fakes[0].received[0].request_id
    assert router.fakes[0].wait_abort(request_id)  # an error may leave the other side holding
    router.assert_no_leaks()


def test_instance_without_capacity_is_503_with_retry_after(start_router, script) -> None:
    fake = FakeInstance(
        "p", Role.MIXED, script, error="no decode instance could take it", error_reason="overloaded"
    )
    router = start_router([fake])
    with router.http() as http:
        response = http.post("/v1/completions", json={"prompt": "x", "stream": True})
    assert response.status_code == 503 and response.headers["Retry-After"]
    assert response.json()["error"]["code"] == "overloaded"
    router.assert_no_leaks()


def test_overload_is_503_with_retry_after(start_router, pd_pair) -> None:
    gate = threading.Event()
    router = start_router(pd_pair(prefill={"gate": gate}), max_inflight_requests=1)
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(_post, router, "first")
        router.fakes[0].wait_received(1)
        with router.http() as http:
            response = http.post("/v1/completions", json={"prompt": "second"})
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert response.json()["error"]["code"] == "overloaded"
        gate.set()
        assert held.result(10)["choices"][0]["text"] == expected_text(2)
    router.assert_no_leaks()


def test_stop_on_the_first_token(start_router, pd_pair) -> None:
    router = start_router(pd_pair())
    # Stop at once: the decode fake keeps sending a little while before the abort lands.
    with router.http() as http:
        response = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 50, "stop": " "})
    assert response.json()["choices"][0] == {
        "index": 0,
        "text": "",
        "finish_reason": "stop",
        "logprobs": None,
    }
    router.assert_no_leaks()
    assert router.stats()["bad_frames"] == 0


def test_retry_after_an_instance_died_is_its_next_attempt(start_router, script) -> None:
    # Both prefill instances hold their first tokens until their gate opens.
    gates = [threading.Event(), threading.Event()]
    decode = FakeInstance("d", Role.DECODE, script)
    prefills = [
        FakeInstance(f"p{i}", Role.PREFILL, script, decode_peer=decode, gate=gates[i], index=i)
        for i in range(2)
    ]
    router = start_router([*prefills, decode])
    with ThreadPoolExecutor(1) as pool:
        reply = pool.submit(_post, router, "hello", 3)
        _wait_total(*prefills, 1)
        dead, other = prefills if prefills[0].received else prefills[::-1]
        first = dead.received[0]
        assert first.attempt == 0

        async def down() -> dict:
            return router.dispatcher.instance_down(dead.name)

        assert router.server.call(down) == {"retried": 1, "failed": 0}
        resent = other.wait_received(1)[0]
        # A request of its own, its id made from the first one; the first is aborted everywhere.
        assert (resent.request_id, resent.attempt) == (f"{first.request_id}~1", 1)
        assert other.wait_abort(first.request_id).reason == "retried on another instance"
        # A late error of the first attempt (the dead one's side) must not end the request.
        dead._send(first.reply_to, [TokenItem(first.request_id, 0, [], "error", "stale")])
        gates[prefills.index(other)].set()
        assert reply.result(10)["choices"][0]["text"] == expected_text(3)
    assert router.stats()["unknown_items"] >= 1
    router.assert_no_leaks()
