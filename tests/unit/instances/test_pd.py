"""Prefill and decode loops with the real cache messager, driven iteration by iteration."""

from __future__ import annotations

from engine.config import Role
from tests.unit.instances.harness import (
    PD,
    Router,
    assert_all_free,
    make_config,
    make_loop,
    pump,
)

PROMPTS = {"a": [5, 6, 7, 8, 9, 10, 11], "b": [40, 41, 42], "c": list(range(20, 45))}
LONG = list(range(100, 200))  # two prefill chunks (64 tokens a step)


def finished(router: Router, *rids: str):
    return lambda: all(router.finish(r) is not None for r in rids)


def all_free(cluster: PD) -> None:
    pump(*cluster.loops, until=lambda: not cluster.prefill.policy.transfers)
    for loop in cluster.loops:
        assert_all_free(loop)


def test_pd_equals_colocated_equals_offline(pd, tiny_model, offline) -> None:
    cluster, router = pd()
    mixed = make_loop(Role.MIXED, 0, make_config(tiny_model))
    try:
        for rid, prompt in {**PROMPTS, "long": LONG}.items():
            router.send(cluster.prefill, rid, prompt)
            router.send(mixed, f"m-{rid}", prompt)
        rids = [*PROMPTS, "long"]
        pump(*cluster.loops, mixed, router=router, until=finished(router, *rids, "m-long"))
        for rid in rids:
            prompt = LONG if rid == "long" else PROMPTS[rid]
            assert router.tokens(rid) == router.tokens(f"m-{rid}") == offline(prompt), rid
        first = router.items["a"][0]
        assert str(first.decode_instance) == "decode-0"
        stamped = ("arrival", "prepared", "prefill_start", "prefill_end")
        assert all(getattr(first.timings, stamp) is not None for stamp in stamped)
        second = next(i for i in router.items["a"] if i.first_index == 1)
        stamped = ("kv_signalled", "writes_done", "kv_complete", "first_decode_step")
        assert all(getattr(second.timings, stamp) is not None for stamp in stamped)
        all_free(cluster)
        assert cluster.prefill.counters["transfers_ok"] == len(rids)
    finally:
        mixed.close()


def test_first_token_finishing_on_p_cancels_d(pd) -> None:
    cluster, router = pd()
    router.send(cluster.prefill, "one", PROMPTS["a"], max_tokens=1)
    pump(*cluster.loops, router=router, until=finished(router, "one"))
    assert len(router.tokens("one")) == 1
    all_free(cluster)
    assert cluster.prefill.counters["transfers_cancelled"] == 1
    assert not cluster.prefill.counters["transfers_failed"]


def test_prepare_pool_full_and_backlog_queue_then_drain(pd, offline) -> None:
    cluster, router = pd(prefill={"prepare_threads": 1, "max_backlog_tokens": 8})
    for rid, prompt in PROMPTS.items():
        router.send(cluster.prefill, rid, prompt)
    pump(*cluster.loops, router=router, until=finished(router, *PROMPTS))
    for rid, prompt in PROMPTS.items():
        assert router.tokens(rid) == offline(prompt)
    all_free(cluster)


def test_queued_request_times_out_as_overloaded(pd) -> None:
    cluster, router = pd(prefill={"prepare_threads": 1})
    cluster.prefill.policy.reserve_timeout_s = 0.0
    router.send(cluster.prefill, "a", PROMPTS["a"])
    router.send(cluster.prefill, "b", PROMPTS["b"])
    pump(cluster.prefill, router=router, until=finished(router, "b"))  # D not pumped: a waits
    assert router.finish("b").finish_reason == "overloaded"
    pump(*cluster.loops, router=router, until=finished(router, "a"))
    assert router.finish("a").finish_reason == "length"
    all_free(cluster)
