"""A real router in front of fake instances: prefix-cache reports on its inbox steer requests."""

from __future__ import annotations

import time

import pytest

from cluster.router.prefix_index import request_block_keys
from engine.config import Role
from engine.protocol.cache_events import PrefixCacheEvents
from engine.protocol.channels import Sender
from engine.protocol.identity import InstanceId
from tests.unit.router.fakes import FakeInstance

BLOCK = 16
PROMPT = "the same long system prompt, sent again and again by every client. " * 2


def _post(router, prompt: str) -> None:
    with router.http() as http:
        response = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2})
    assert response.status_code == 200, response.text


def _report(router, instance: InstanceId, keys: list, seq: int = 0) -> None:
    before = router.stats()["routing"]["index"]["reports"]
    sender = Sender(router.dispatcher.inbox_address)
    sender.send(PrefixCacheEvents(instance, "inc", seq, BLOCK, 1000, 900, stored=keys))
    sender.close()
    deadline = time.monotonic() + 10
    while router.stats()["routing"]["index"]["reports"] == before:
        assert time.monotonic() < deadline, "the router did not take the report"
        time.sleep(0.01)


@pytest.mark.parametrize("routing", ["cache_aware", "load"])
def test_reported_prefix_draws_its_requests(start_router, script, routing: str) -> None:
    decode = FakeInstance("d", Role.DECODE, script)
    p0 = FakeInstance("p0", Role.PREFILL, script, decode_peer=decode)
    p1 = FakeInstance("p1", Role.PREFILL, script, decode_peer=decode, index=1)
    router = start_router([p0, p1, decode], routing=routing)
    _post(router, PROMPT)
    prompt_ids = (p0.received or p1.received)[0].prompt_token_ids
    holder, other = (p1, p0) if p0.received else (p0, p1)  # the one that has not seen it
    _report(router, holder.name, request_block_keys(prompt_ids, BLOCK))
    for _ in range(4):
        _post(router, PROMPT)
    decisions = router.stats()["routing"]["decisions"]
    if routing == "cache_aware":
        assert len(holder.received) == 4 and len(other.received) == 1
        assert decisions == {"prefill/load": 1, "prefill/cache_hit": 4}
    else:  # equal loads: the rotation spreads them
        assert len(holder.received) >= 1 and len(other.received) >= 2
        assert decisions == {"prefill/load": 5}
    router.assert_no_leaks()


def test_a_dead_instance_is_forgotten(start_router, script) -> None:
    decode = FakeInstance("d", Role.DECODE, script)
    p0 = FakeInstance("p0", Role.PREFILL, script, decode_peer=decode)
    router = start_router([p0, decode])
    _report(router, p0.name, [bytes([i]) * 32 for i in (1, 2, 3)])  # 32-byte keys
    assert router.stats()["routing"]["index"]["blocks"] == {"prefill-0": 3}

    async def down() -> None:
        router.dispatcher.instance_down(p0.name)

    router.server.call(down)
    assert router.stats()["routing"]["index"]["blocks"] == {}


@pytest.mark.parametrize("routing", ["cache_aware", "load"])
def test_prefill_hears_which_decode_instance_holds_the_prefix(
    start_router, script, routing: str
) -> None:
    d0 = FakeInstance("d0", Role.DECODE, script)
    d1 = FakeInstance("d1", Role.DECODE, script, index=1)
    p0 = FakeInstance("p0", Role.PREFILL, script, decode_peer=d0)
    router = start_router([p0, d0, d1], routing=routing)
    _post(router, PROMPT)
    first = p0.received[0]
    assert first.decode_hint is None  # no decode instance has reported yet
    _report(router, d0.name, [])
    _report(router, d1.name, request_block_keys(first.prompt_token_ids, BLOCK)[:2])
    _post(router, PROMPT)
    second = p0.received[1]
    if routing == "cache_aware":
        assert second.decode_hint == d1.name and second.reuse_decode_prefix
        assert router.stats()["routing"]["decisions"]["decode/cache_hit"] == 1
    else:
        assert second.decode_hint is None and not second.reuse_decode_prefix
    router.assert_no_leaks()
    assert router.stats()["routing"]["decode_inflight"] == {}
