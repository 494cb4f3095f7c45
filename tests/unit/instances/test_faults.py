"""Faults around a PD request: a stalled D, a lost cache messager, a handler that raises on P.
After each, every block on P and D is free and the loops serve on."""

from __future__ import annotations

from engine.protocol.identity import MessagerId
from tests.unit.instances.harness import PD, Router, assert_all_free, pump

PROMPT = [5, 6, 7, 8, 9, 10, 11]
OTHER = [40, 41, 42]


def serves_on(cluster: PD, router: Router, offline, loops=None) -> None:
    loops = loops or cluster.loops
    router.send(cluster.prefill, "after", OTHER)
    pump(*loops, router=router, until=lambda: router.finish("after") is not None)
    assert router.tokens("after") == offline(OTHER)


def all_free(*loops) -> None:
    for loop in loops:
        assert_all_free(loop)


def test_stalled_d_is_passed_over_and_its_late_answer_cancelled(pd, offline) -> None:
    cluster, router = pd(decodes=2, prefill={"allocation_timeout_s": 0.3})
    p, stalled, healthy = cluster.prefill, *cluster.decodes
    router.send(p, "a", PROMPT)
    pump(p, healthy, router=router, until=lambda: router.finish("a") is not None)
    assert router.tokens("a") == offline(PROMPT)
    assert str(router.items["a"][0].decode_instance) == "decode-1"
    serves_on(cluster, router, offline, [p, healthy])
    # The stalled D wakes: it allocates, then reads P's cancel (same socket, later) and frees.
    pump(p, stalled, until=lambda: p.counters["late_allocations"] >= 1)
    pump(stalled, until=lambda: not stalled.core.scheduler.requests)
    all_free(*cluster.loops)


def test_every_d_stalled_fails_as_overloaded_and_frees(pd) -> None:
    cluster, router = pd(prefill={"allocation_timeout_s": 0.2, "max_decode_attempts": 2})
    p = cluster.prefill
    router.send(p, "a", PROMPT)
    pump(p, router=router, until=lambda: router.finish("a") is not None)
    finish = router.finish("a")
    assert finish.finish_reason == "overloaded"
    assert "no decode instance could take the request (decode-0: timeout)" in finish.error
    assert p.counters["overloaded_requests"] == 1
    pump(*cluster.loops, until=lambda: not cluster.decodes[0].core.scheduler.requests)
    all_free(*cluster.loops)


def test_lost_messager_transfer_deadline_frees_p_lease_frees_d(pd, offline) -> None:
    cluster, router = pd(prefill={"transfer_timeout_s": 0.5}, decode={"kv_lease_timeout_s": 5})
    p, d = cluster.prefill, cluster.decodes[0]
    cluster.messager.shutdown()  # its inbox is gone: P's messages to it go nowhere
    router.send(p, "a", PROMPT)
    pump(p, d, router=router, until=lambda: router.finish("a") is not None)
    assert "cache messager did not answer" in router.finish("a").error
    assert p.counters["transfers_failed"] == 1
    pump(p, d, until=lambda: not d.policy.leases)
    assert d.counters["leases_expired"] == 1
    all_free(p, d)
    cluster.messager = cluster.start_messager(MessagerId(1))
    serves_on(cluster, router, offline)


def test_restarted_messager_ends_its_requests_at_once(pd, offline) -> None:
    cluster, router = pd(decode={"kv_lease_timeout_s": 5})
    p, d = cluster.prefill, cluster.decodes[0]
    cluster.messager.shutdown()
    router.send(p, "a", PROMPT)
    pump(p, d, until=lambda: "a" in p.policy.transfers and p.policy.transfers["a"].started)
    cluster.messager = cluster.start_messager(MessagerId(1))  # connect(): a new messager inbox
    pump(p, router=router, until=lambda: router.finish("a") is not None)
    assert router.finish("a").error == "the cache messager restarted"
    assert p.counters["requests_ended_by_failure"] == 1
    all_free(p)
    serves_on(cluster, router, offline)
    pump(p, d, until=lambda: not d.policy.leases)  # D's lease frees the orphaned allocation
    all_free(p, d)


def test_a_raising_handler_on_p_fails_that_request_and_cancels_d(pd, offline, monkeypatch):
    cluster, router = pd()
    p, d = cluster.prefill, cluster.decodes[0]
    admit = p.policy._admit

    def buggy(prep, reply) -> None:
        if prep.request.request_id == "a":
            raise KeyError("bug")
        admit(prep, reply)

    monkeypatch.setattr(p.policy, "_admit", buggy)
    router.send(p, "a", PROMPT)
    pump(p, d, router=router, until=lambda: router.finish("a") is not None)
    assert "internal error handling Answer" in router.finish("a").error
    pump(p, d, until=lambda: not d.core.scheduler.requests)  # D's allocation was cancelled
    assert p.counters["handler_errors"] == 1
    serves_on(cluster, router, offline)
    all_free(p, d)


def test_decode_down_ends_its_requests(pd, offline) -> None:
    cluster, router = pd(decodes=2)
    p, d0, d1 = cluster.prefill, *cluster.decodes
    router.send(p, "a", PROMPT, max_tokens=50)
    pump(p, d0, d1, until=lambda: "a" in p.policy.transfers)
    p.policy.decode_down(p.clients["a"].decode)  # the D its transfer goes to
    pump(p, router=router, until=lambda: router.finish("a") and not p.policy.transfers)
    assert router.finish("a").finish_reason == "error"
    assert p.counters["requests_ended_by_failure"] == 1
    survivor = d1 if p.policy.picker.snapshot()[0]["name"] == "decode-1" else d0
    serves_on(cluster, router, offline, [p, survivor])
    all_free(p)


def test_a_raising_handler_on_d_fails_that_request_only(pd, offline, monkeypatch) -> None:
    cluster, router = pd()
    p, d = cluster.prefill, cluster.decodes[0]
    handle = d.policy.handle

    def buggy(msg) -> None:
        handle(msg)  # KV arrived and the request joined the batch when the bug strikes
        if type(msg).__name__ == "KvComplete" and msg.request_id == "a":
            raise RuntimeError("bug")

    monkeypatch.setattr(d.policy, "handle", buggy)
    router.send(p, "a", PROMPT)
    pump(p, d, router=router, until=lambda: router.finish("a") is not None)
    assert "internal error handling KvComplete" in router.finish("a").error
    assert d.counters["handler_errors"] == 1
    serves_on(cluster, router, offline)
    all_free(p, d)
