"""A stream under way that finds no capacity waits for some instead of failing (issue #16).

The fake prefill instance refuses moved attempts as "overloaded", as a real one does while the
surviving decode instance is full; its decode peer fails each first run at output token 25, so
every stream is moved once after it started."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from cluster.config import RouterConfig
from cluster.router.capacity_wait import CapacityWaits
from cluster.router.streams import RequestStream
from engine.config import Role
from engine.protocol.identity import InstanceId
from engine.protocol.tokens import TokenItem
from tests.unit.router.fakes import expected_text
from tests.unit.router.test_migration import MAX_TOKENS, _errors, _stream, _text


def test_a_moved_stream_refused_for_capacity_waits_and_goes_on(start_router, pd_pair) -> None:
    router = start_router(pd_pair(prefill={"refuse_moved": 2}, decode={"fail_at": 25}))
    events = _stream(router, threading.Event())
    assert _errors(events) == [] and events[-1] == "[DONE]"
    assert _text(events) == expected_text(MAX_TOKENS)  # nothing lost, nothing repeated
    _first, refused, again, served = router.fakes[0].wait_received(4)
    assert [m.attempt for m in (refused, again, served)] == [1, 2, 3]
    assert served.sampling.prior_output_tokens == 25
    stats = router.wait_idle()
    assert stats["capacity_waits"] == 2 and stats["capacity_waits_expired"] == 0
    assert stats["moved_requests"] == 3  # waits are not failures: not bounded by MAX_MOVES
    router.assert_no_leaks()


def test_the_wait_is_bounded_then_the_client_gets_the_refusal(start_router, pd_pair) -> None:
    fakes = pd_pair(prefill={"refuse_moved": 10_000}, decode={"fail_at": 25})
    router = start_router(fakes, capacity_wait_s=1.0)
    events = _stream(router, threading.Event())
    [error] = _errors(events)
    assert "request overloaded: " in error["message"] and "no free blocks" in error["message"]
    assert _text(events) == expected_text(25)
    stats = router.wait_idle()
    assert stats["capacity_waits_expired"] == 1 and stats["waiting_for_capacity"] == 0
    # Backoff from 0.2 s: a handful of tries in a second, not a busy loop.
    assert 2 <= len(router.fakes[0].received) <= 8
    router.assert_no_leaks()


def test_no_wait_when_switched_off(start_router, pd_pair) -> None:
    fakes = pd_pair(prefill={"refuse_moved": 10_000}, decode={"fail_at": 25})
    router = start_router(fakes, capacity_wait_s=0)
    events = _stream(router, threading.Event())
    assert ["overloaded" in e["message"] for e in _errors(events)] == [True]
    assert len(router.fakes[0].received) == 2  # the first run and the refused move
    router.assert_no_leaks()


def test_new_requests_get_503_while_a_stream_waits(start_router, pd_pair) -> None:
    # Six refusals: the stream waits ~5 s in all (0.2 + 0.4 + 0.8 + 1.6 + 2 + 2 minus the last).
    router = start_router(pd_pair(prefill={"refuse_moved": 6}, decode={"fail_at": 25}))
    body = {"prompt": "hi", "max_tokens": 3}
    refused = None
    with ThreadPoolExecutor(1) as pool, router.http() as http:
        streamed = pool.submit(_stream, router, threading.Event())
        deadline = time.monotonic() + 30
        while refused is None and time.monotonic() < deadline and not streamed.done():
            if router.stats()["waiting_for_capacity"]:
                response = http.post("/v1/completions", json=body)
                if response.status_code == 503:
                    refused = response
            time.sleep(0.02)
        events = streamed.result(60)
        assert refused is not None, "no new request was refused while the stream waited"
        assert refused.json()["error"]["code"] == "overloaded"
        assert "waiting for KV capacity" in refused.json()["error"]["message"]
        assert refused.headers["retry-after"]
        assert _errors(events) == [] and _text(events) == expected_text(MAX_TOKENS)
        # Once nothing waits, new requests are served again.
        response = http.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
    router.assert_no_leaks()


def test_a_resent_stream_holds_new_requests_back_until_it_is_served() -> None:
    async def scenario() -> None:
        resent = asyncio.Event()

        def resend(stream: RequestStream, why: str) -> bool:
            stream.move(InstanceId(Role.PREFILL, 1))
            resent.set()
            return True

        waits = CapacityWaits(30.0, resend)
        stream = RequestStream("r", InstanceId(Role.PREFILL, 0), 4, RouterConfig())
        assert not waits.park(stream, "full")  # no token yet, never moved: a plain 503
        stream.add(TokenItem("r", 0, [7]))
        assert waits.park(stream, "full") and waits.is_parked(stream) and waits.waiting == 1
        await asyncio.wait_for(resent.wait(), 10)
        assert not waits.is_parked(stream) and stream.capacity_retries == 1
        assert waits.waiting == 1  # sent again, not served yet: new requests still wait
        waits.progressed(stream)
        assert waits.waiting == 0
        assert waits.park(stream, "full again") and waits.waiting == 1
        waits.forget(stream)  # released (e.g. the client left): no resend, nothing waits
        assert waits.waiting == 0 and not waits.is_parked(stream)

    asyncio.run(scenario())
