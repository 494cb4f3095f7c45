"""The mixed (colocated) role's loop: serving, bad input, a raising handler, a failing step."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
import zmq

from engine.config import Role
from engine.protocol import codec, registry
from engine.protocol.requests import GenerateRequest
from engine.sampling_params import SamplingParams
from tests.unit.instances.harness import Router, assert_all_free, make_config, make_loop, pump
from worker.malloc_trim import MallocTrimmer

PROMPTS = {"a": [5, 6, 7, 8, 9, 10, 11], "b": [40, 41, 42], "c": list(range(20, 45))}


@pytest.fixture
def mixed(tiny_model):
    loop = make_loop(Role.MIXED, 0, make_config(tiny_model))
    router = Router()
    yield loop, router
    loop.close()
    router.close()


def serve(loop, router, prompts: dict[str, list[int]]) -> None:
    for rid, prompt in prompts.items():
        router.send(loop, rid, prompt)
    pump(loop, router=router, until=lambda: all(router.finish(r) for r in prompts))


def test_serves_the_offline_tokens(mixed, offline) -> None:
    loop, router = mixed
    serve(loop, router, PROMPTS)
    for rid, prompt in PROMPTS.items():
        assert router.tokens(rid) == offline(prompt), rid
        assert router.finish(rid).finish_reason == "length"
    assert all(item.timings is None for item in router.items["a"])  # no TTFT phase to stamp
    assert_all_free(loop)


def test_malformed_frames_are_dropped_and_the_loop_serves_on(mixed, offline) -> None:
    loop, router = mixed
    raw = zmq.Context.instance().socket(zmq.PUSH)
    raw.connect(loop.inbox.address)
    raw.send(b"\x93\x01\x02")  # msgpack, but no message of this protocol
    raw.send(b"not msgpack at all \xff")
    raw.send(_request_with_bad_sampling(router.inbox.address))  # a typed record that is not
    raw.close(linger=1000)
    router.send(loop, "too-long", list(range(600)))
    serve(loop, router, {"a": PROMPTS["a"]})
    assert loop.inbox.bad_frames == 3
    assert "context" in router.finish("too-long").error
    assert router.tokens("a") == offline(PROMPTS["a"])
    assert_all_free(loop)


def test_a_raising_handler_fails_that_request_only(mixed, offline, monkeypatch) -> None:
    loop, router = mixed
    handle = loop.policy.handle

    def buggy(msg) -> None:
        handle(msg)  # the request is in the engine (holding blocks) when the bug strikes
        if msg.request_id == "b":
            raise KeyError("bug")

    monkeypatch.setattr(loop.policy, "handle", buggy)
    serve(loop, router, PROMPTS)
    assert "internal error handling GenerateRequest" in router.finish("b").error
    for rid in ("a", "c"):
        assert router.tokens(rid) == offline(PROMPTS[rid])
    assert loop.counters["handler_errors"] == 1
    assert_all_free(loop)


def test_a_failing_step_ends_its_requests_only(mixed, offline, monkeypatch) -> None:
    loop, router = mixed
    execute = loop.core.runner.execute_model
    calls = {"n": 0}

    def fails_once(sched):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("device lost")
        return execute(sched)

    monkeypatch.setattr(loop.core.runner, "execute_model", fails_once)
    serve(loop, router, {"a": PROMPTS["a"]})
    assert router.finish("a").finish_reason == "error"
    assert "device lost" in router.finish("a").error
    serve(loop, router, {"b": PROMPTS["b"]})  # the loop serves on
    assert router.tokens("b") == offline(PROMPTS["b"])
    assert loop.failed_steps == 1
    assert_all_free(loop)


def test_abort_while_running_frees_at_once(mixed) -> None:
    loop, router = mixed
    router.send(loop, "a", PROMPTS["a"], max_tokens=200)
    pump(loop, router=router, until=lambda: len(router.tokens("a")) >= 2)
    router.abort(loop, "never-seen")  # first: one socket keeps order, so it is applied by the
    router.abort(loop, "a")  # time "a" has left the scheduler, however loaded the machine
    pump(loop, router=router, until=lambda: not loop.core.scheduler.requests)
    assert loop.counters["unknown_request_messages"] == 1
    assert_all_free(loop)


def test_threaded_loop_answers_calls_and_beats(mixed, offline) -> None:
    loop, router = mixed
    loop.start()
    try:
        router.send(loop, "a", PROMPTS["a"])
        stats = loop.call(loop.stats, timeout_s=30)
        assert stats["role"] == "mixed" and stats["heartbeat_age_s"] < 30
        assert stats["max_num_seqs"] > 0 and stats["busy_s"] >= 0
        pump(router=router, until=lambda: router.finish("a") is not None)
        assert router.tokens("a") == offline(PROMPTS["a"])
        with pytest.raises(ZeroDivisionError):  # an exception goes to the caller
            loop.call(lambda: 1 / 0, timeout_s=30)
        assert loop.alive
    finally:
        loop.stop()


def test_an_idle_loop_trims_malloc(mixed) -> None:
    loop, _ = mixed
    trims: list[int] = []
    loop.trimmer = MallocTrimmer(0.0, 60.0, trim=lambda pad: trims.append(pad) or 1)
    loop.iterate()
    assert trims == [0]


def _request_with_bad_sampling(reply_to: str) -> bytes:
    """A GenerateRequest whose nested SamplingParams says temperature "hot": the codec refuses
    it at the inbox (a correct sender cannot even build it)."""
    values = [getattr(SamplingParams(), f.name) for f in dataclasses.fields(SamplingParams)]
    values[0] = "hot"
    sampling = msgpack.packb([codec.PROTOCOL_VERSION, registry.TYPE_IDS[SamplingParams], *values])
    fields = ["bad-params", [5, 6], msgpack.ExtType(1, sampling), reply_to, 0.0, 0]
    return msgpack.packb([codec.PROTOCOL_VERSION, registry.TYPE_IDS[GenerateRequest], *fields])
