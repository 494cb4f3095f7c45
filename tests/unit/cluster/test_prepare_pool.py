"""The prepare pool against decode stand-ins speaking the real protocol over real zmq sockets."""

from __future__ import annotations

import threading
import time

import pytest

from cluster.config import PrefillConfig
from cluster.instances.decode_picker import DecodePicker
from cluster.instances.prepare_pool import Preparation, PreparePool
from engine.protocol.channels import SenderPool
from engine.protocol.requests import AbortRequest, GenerateRequest
from engine.request import Request
from engine.sampling_params import SamplingParams
from tests.unit.cluster.standins import FakeDecode, FakePrefill, route_replies


@pytest.fixture
def env():
    made: list = []

    def build(policies: list, threads: int = 4, timeout: float = 0.3, attempts: int = 3):
        decodes = [FakeDecode(i, p, free=200 - i) for i, p in enumerate(policies)]
        prefill = FakePrefill()
        config = PrefillConfig(
            prepare_threads=threads, allocation_timeout_s=timeout, max_decode_attempts=attempts
        )
        picker = DecodePicker([d.peer() for d in decodes], penalty_s=5.0, suspect_after_s=0.1)
        pool = PreparePool(config, picker, prefill.hooks(), SenderPool(), reserve_timeout_s=0.5)
        router = threading.Thread(target=route_replies, args=(prefill, pool), daemon=True)
        router.start()
        made.append((decodes, prefill, pool))
        return decodes, prefill, pool

    yield build
    for decodes, prefill, pool in made:
        pool.shutdown()
        prefill.inbox.close()
        for d in decodes:
            d.close()


def submit(pool: PreparePool, rid: str) -> None:
    request = Request(rid, [1, 2, 3], SamplingParams(max_tokens=4))
    msg = GenerateRequest(rid, [1, 2, 3], request.sampling_params, "tcp://x:1", 0.0)
    pool.submit(Preparation(msg, request))


def wait_for(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_refusal_goes_to_the_next_decode(env) -> None:
    _, prefill, pool = env(["refuse", "accept"])
    submit(pool, "r1")
    wait_for(lambda: "r1" in prefill.admitted)
    assert prefill.admitted["r1"] == "decode-1" and not prefill.reserved


def test_timeout_tries_another_and_cancels_the_late_one(env) -> None:
    decodes, prefill, pool = env(["silent", "accept"])  # d0 looks emptier: asked first
    submit(pool, "r1")
    wait_for(lambda: "r1" in prefill.admitted)
    assert decodes[0].tasks == ["r1"] and prefill.admitted["r1"] == "decode-1"
    wait_for(lambda: decodes[0].cancels == ["r1"])


def test_all_refuse_fails_clearly_and_frees(env) -> None:
    _, prefill, pool = env(["refuse", "refuse"])
    submit(pool, "r1")
    wait_for(lambda: "r1" in prefill.failed)
    assert "no decode instance could take the request" in prefill.failed["r1"]
    assert not prefill.reserved and pool.queue_depth == 0


def test_abort_while_waiting_frees_and_cancels(env) -> None:
    decodes, prefill, pool = env(["silent"], timeout=5.0)
    submit(pool, "r1")
    wait_for(lambda: decodes[0].tasks == ["r1"])
    assert not pool.abort(AbortRequest("r1", "an earlier attempt", attempt=-1))
    assert pool.abort(AbortRequest("r1", "client gone"))
    wait_for(lambda: pool.queue_depth == 0)
    assert not prefill.reserved and "r1" not in prefill.failed  # aborted: nobody to tell
    wait_for(lambda: decodes[0].cancels == ["r1"])


def test_stalled_decode_does_not_stall_requests_another_can_take(env) -> None:
    decodes, prefill, pool = env(["silent", "accept"], threads=4, timeout=2.0)
    for i in range(8):
        submit(pool, f"r{i}")
    # Within one allocation timeout, every request not already waiting on the stalled D is
    # admitted by the healthy one; the stalled D stops attracting requests once it is suspect.
    wait_for(lambda: len(prefill.admitted) == 8 - len(decodes[0].tasks), timeout=1.9)
    assert len(decodes[0].tasks) <= 2
    wait_for(lambda: len(prefill.admitted) == 8, timeout=10)
    assert set(prefill.admitted.values()) == {"decode-1"}
