"""An abort in every state of a PD request, each race window held open deterministically: a peer
that is not pumped holds its answers, a gate holds a prepare worker or the messager. After
each, every block on P and D is free and the loops serve on."""

from __future__ import annotations

import threading

import zmq

from engine.request import RequestStatus
from tests.unit.instances.harness import (
    ENGINE,
    PD,
    Router,
    assert_all_free,
    pump,
)

PROMPT = [5, 6, 7, 8, 9, 10, 11]
LONG = list(range(100, 200))  # two prefill chunks


class Gate:
    """Holds calls of `fn` (on another thread) until opened."""

    def __init__(self, fn) -> None:
        self.fn, self.opened, self.reached = fn, threading.Event(), threading.Event()

    def __call__(self, *args):
        self.reached.set()
        assert self.opened.wait(60)
        return self.fn(*args)


def readable(fd_or_socket) -> bool:
    poller = zmq.Poller()
    poller.register(fd_or_socket, zmq.POLLIN)
    return bool(poller.poll(10_000))


def abort_everywhere(cluster: PD, router: Router, rid: str) -> None:
    """As the router does: the abort goes to every instance."""
    for loop in cluster.loops:
        router.abort(loop, rid)


def finish_and_check(cluster: PD, router: Router, offline, aborted: str) -> None:
    """The aborted request told nobody; the loops serve a new request; everything is free."""
    pump(*cluster.loops, until=lambda: not cluster.prefill.policy.transfers)
    pump(*cluster.loops, until=lambda: not cluster.decodes[0].policy.leases)
    router.send(cluster.prefill, "after", PROMPT)
    pump(*cluster.loops, router=router, until=lambda: router.finish("after") is not None)
    assert router.tokens("after") == offline(PROMPT)
    assert router.finish(aborted) is None  # the client is gone: nothing is sent to it
    for loop in cluster.loops:
        assert_all_free(loop)
        assert not loop.counters["handler_errors"]
    assert not cluster.prefill.counters["transfers_failed"]


def test_abort_while_queued(pd, offline) -> None:
    cluster, router = pd(prefill={"prepare_threads": 1})
    p = cluster.prefill
    router.send(p, "a", PROMPT)
    router.send(p, "b", PROMPT)
    pump(p, until=lambda: len(p.policy.queued) == 1)  # D not pumped: a holds the only worker
    abort_everywhere(cluster, router, "b")
    pump(p, until=lambda: not p.policy.queued)
    pump(*cluster.loops, router=router, until=lambda: router.finish("a") is not None)
    assert cluster.decodes[0].counters["unknown_request_messages"] == 1  # D never knew b
    finish_and_check(cluster, router, offline, "b")


def test_abort_while_d_holds_its_answer(pd, offline) -> None:
    cluster, router = pd()
    p, d = cluster.prefill, cluster.decodes[0]
    router.send(p, "a", PROMPT)
    pump(p, until=lambda: "a" in p.policy.preparing)
    abort_everywhere(cluster, router, "a")
    # P frees its blocks at once; the worker stops waiting and cancels on D.
    pump(p, until=lambda: not p.policy.preparing)
    assert p.core.block_manager.num_free_blocks == p.core.block_manager.num_blocks
    pump(d, until=lambda: d.counters["allocations_accepted"] == 1 and not d.core.scheduler.requests)
    finish_and_check(cluster, router, offline, "a")


def test_abort_after_d_accepted_before_the_worker_hands_back(pd, offline) -> None:
    cluster, router = pd(prefill={"prepare_threads": 1})
    p, d = cluster.prefill, cluster.decodes[0]
    worker = p.policy.workers[0]
    gate = worker._hand_back = Gate(worker._hand_back)
    router.send(p, "a", PROMPT)
    pump(p, until=lambda: "a" in p.policy.preparing)
    pump(d, until=gate.reached.is_set)  # D allocated; the worker holds its answer
    abort_everywhere(cluster, router, "a")
    pump(p, until=lambda: p.policy.preparing["a"].aborted)
    gate.opened.set()
    pump(p, d, until=lambda: not p.policy.preparing and not d.core.scheduler.requests)
    finish_and_check(cluster, router, offline, "a")


def test_abort_after_the_answer_reached_the_loop_before_admission(pd, offline) -> None:
    cluster, router = pd()
    p, d = cluster.prefill, cluster.decodes[0]
    router.send(p, "a", PROMPT)
    pump(p, until=lambda: "a" in p.policy.preparing)
    pump(d, until=lambda: d.counters["allocations_accepted"] == 1)
    assert readable(p.mailbox.fileno())  # the accepted answer waits in P's mailbox
    abort_everywhere(cluster, router, "a")
    assert readable(p.inbox.socket)
    p.iterate()  # admits, then applies the abort in the same iteration
    assert "a" not in p.core.scheduler.requests and p.policy.transfers["a"].on_purpose
    finish_and_check(cluster, router, offline, "a")
    assert p.counters["transfers_cancelled"] == 1


def test_abort_while_prefilling(pd, offline) -> None:
    cluster, router = pd()
    p = cluster.prefill
    router.send(p, "a", LONG)
    pump(*cluster.loops, until=lambda: "a" in p.policy.transfers)  # first chunk computed
    request = p.core.scheduler.requests["a"]
    assert request.status is RequestStatus.RUNNING and 0 < request.num_computed_tokens < len(LONG)
    abort_everywhere(cluster, router, "a")
    finish_and_check(cluster, router, offline, "a")


def test_abort_while_sending_kv_frees_only_after_the_messager(pd, offline) -> None:
    cluster, router = pd()
    p = cluster.prefill
    gate = cluster.messager._report = Gate(cluster.messager._report)
    router.send(p, "a", PROMPT)
    pump(*cluster.loops, until=gate.reached.is_set)  # every write done; the report held
    assert p.core.scheduler.requests["a"].status is RequestStatus.SENDING_KV
    abort_everywhere(cluster, router, "a")
    pump(*cluster.loops, until=lambda: p.policy.transfers["a"].on_purpose)
    assert p.core.block_manager.num_free_blocks < p.core.block_manager.num_blocks  # held
    gate.opened.set()
    finish_and_check(cluster, router, offline, "a")


def test_abort_while_decoding(pd, offline) -> None:
    cluster, router = pd()
    router.send(cluster.prefill, "a", PROMPT, max_tokens=200)
    pump(*cluster.loops, router=router, until=lambda: len(router.tokens("a")) >= 3)
    router.items.pop("a")
    abort_everywhere(cluster, router, "a")
    pump(*cluster.loops, until=lambda: not cluster.decodes[0].core.scheduler.requests)
    finish_and_check(cluster, router, offline, "a")


def test_abort_storm_leaves_the_others_whole(pd, offline) -> None:
    """Many requests at once, every other one aborted at a different moment; the others get
    their whole answer and nothing stays held."""
    roomy = {"scheduler": ENGINE["scheduler"], "cache": {"num_blocks": 256}}  # D never refuses
    cluster, router = pd(
        prefill={"prepare_threads": 2, "max_backlog_tokens": 32}, decode={"engine": roomy}
    )
    prompts = {f"r{i}": [5 + i, 6, 7, 8 + i, 9, 10 + i] * (1 + i % 3) for i in range(16)}
    for rid, prompt in prompts.items():
        router.send(cluster.prefill, rid, prompt)
    leaving = {rid: 2 * i for i, rid in enumerate(prompts) if int(rid[1:]) % 2}
    for iteration in range(200):
        for rid, when in leaving.items():
            if when == iteration:
                abort_everywhere(cluster, router, rid)
        for loop in cluster.loops:
            loop.iterate(0.001)
        router.collect()
    staying = [rid for rid in prompts if rid not in leaving]
    pump(*cluster.loops, router=router, until=lambda: all(router.finish(r) for r in staying))
    for rid in staying:
        assert router.tokens(rid) == offline(prompts[rid]), (rid, router.finish(rid))
    pump(*cluster.loops, until=lambda: not cluster.prefill.policy.transfers)
    pump(*cluster.loops, until=lambda: not cluster.decodes[0].policy.leases)
    for loop in cluster.loops:
        assert_all_free(loop)
        assert not loop.counters["handler_errors"] and not loop.failed_steps
