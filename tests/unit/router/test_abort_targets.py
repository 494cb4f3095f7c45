"""The router sends an abort only to the instances that hold the request."""

from __future__ import annotations

import contextlib
import json
import threading

import httpx

from engine.config import Role
from tests.unit.router.fakes import FakeInstance


def _stream_then_disconnect(router) -> str:
    body = {"prompt": "hi", "max_tokens": 200, "stream": True, "ignore_eos": True}
    with router.http() as http, http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        first = json.loads(next(line for line in lines if line.startswith("data: "))[6:])
        next(lines)
        next(lines)  # D has streamed too by now
        return first["id"].removeprefix("cmpl-")


def test_abort_reaches_its_p_and_d_only(start_router, pd_pair) -> None:
    fakes = pd_pair("a-", decode={"step_s": 0.02}) + pd_pair("b-", decode={"step_s": 0.02})
    router = start_router(fakes)
    request_id = _stream_then_disconnect(router)
    router.assert_no_leaks()  # every abort has gone out
    served = [f for f in fakes if any(m.request_id == request_id for m in f.received)]
    assert {f.role for f in served} == {Role.PREFILL, Role.DECODE}
    for fake in served:
        assert fake.wait_abort(request_id).reason == "client disconnected"
    for fake in fakes:
        if fake not in served:
            assert fake.aborts == [], fake.name  # sent after the others', had it been sent
    assert router.stats()["aborts_sent"] == 2


def test_abort_before_the_first_token_goes_to_p_only(start_router, script) -> None:
    """P has not reported a D yet: only P hears of it (P cancels a D it chose itself)."""
    p = FakeInstance("p", Role.PREFILL, script, gate=threading.Event())  # never answers
    d = FakeInstance("d", Role.DECODE, script)
    router = start_router([p, d])
    with router.http() as http:
        thread = threading.Thread(target=_post_and_give_up, args=(http,), daemon=True)
        thread.start()
        p.wait_received(1)
        thread.join(10)
    request_id = p.received[0].request_id
    assert p.wait_abort(request_id).reason == "client disconnected"
    router.assert_no_leaks()
    assert d.aborts == []


def _post_and_give_up(http) -> None:
    # The read timeout is the point: the client gives up and disconnects.
    with contextlib.suppress(httpx.TimeoutException):
        http.post("/v1/completions", json={"prompt": "x", "max_tokens": 3}, timeout=0.5)
