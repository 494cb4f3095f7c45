"""Switching instance roles on the loop (elastic prefill/decode), without Ray: switchable loops
built as a deployment builds them, the real cache messager and TCP transfer, driven iteration by
iteration. The test plays the actuator: it tells P which decode instances to use, starts the
switch, and wires a new prefill instance's messager."""

from __future__ import annotations

from concurrent.futures import Future

import pytest

from cluster.instances.actor import build_switchable
from cluster.instances.loop import InstanceLoop
from cluster.instances.switch import start_switch
from cluster.messager.actor import CacheMessager
from engine.config import Role
from engine.protocol.channels import Inbox
from engine.protocol.identity import InstanceId, MessagerId
from engine.protocol.splitwise import CancelDecode, DecodeAllocation, DecodeTask
from engine.sampling_params import SamplingParams
from tests.unit.instances.harness import HOST, Router, assert_all_free, make_config, make_loop, pump

PROMPTS = {"a": [5, 6, 7, 8, 9, 10, 11], "b": [40, 41, 42], "c": list(range(20, 45))}
ELASTIC = {"enabled": True}


class Elastic:
    """Switchable loops: prefill-0 with its messager, decode-0 and decode-1."""

    def __init__(self, model) -> None:
        self.config = make_config(model, elastic=ELASTIC)
        self.prefill = self.make(InstanceId(Role.PREFILL, 0))
        self.decodes = [self.make(InstanceId(Role.DECODE, i)) for i in range(2)]
        self.messagers: dict[InstanceId, CacheMessager] = {}
        self.connect_prefill(self.prefill, self.decodes)

    def make(self, name: InstanceId) -> InstanceLoop:
        core, roles = build_switchable(name, self.config, HOST)
        return InstanceLoop(name, HOST, core, roles[name.role], roles=roles)

    @property
    def loops(self) -> list[InstanceLoop]:
        return [self.prefill, *self.decodes]

    @staticmethod
    def info(loop: InstanceLoop) -> dict:
        out: dict = {"name": loop.name, "inbox": loop.inbox.address}
        for policy in loop.roles.values():
            out.update(policy.info())
        return out

    def connect_prefill(self, loop: InstanceLoop, decodes: list[InstanceLoop]) -> None:
        """What the actuator does for a (new) prefill instance: a messager mapping its KV,
        connected to the decode instances, and P wired to both."""
        prefill = loop.roles[Role.PREFILL]
        infos = [self.info(d) for d in decodes]
        messager = self.messagers.get(loop.name)
        if messager is None:
            index = 10 + len(self.messagers)
            messager = CacheMessager(MessagerId(index), "tcp", 2.0)
            kv = prefill.info()["kv_cache"]
            messager.setup(HOST, kv, loop.inbox.address)
            self.messagers[loop.name] = messager
        messager.add_decode_peers(infos, only_new=True)
        prefill.connect(messager.inbox.address, infos)

    def switch(self, loop: InstanceLoop, role: Role, drain_s: float = 30.0) -> Future:
        return start_switch(loop, role, drain_s, drain_s + 30.0, True)

    def close(self) -> None:
        for loop in self.loops:
            loop.close()
        for messager in self.messagers.values():
            messager.shutdown()


@pytest.fixture
def elastic(tiny_model):
    made = Elastic(tiny_model)
    router = Router()
    yield made, router
    made.close()
    router.close()


def finished(router: Router, *rids: str):
    return lambda: all(router.finish(r) is not None for r in rids)


def settle(cluster: Elastic, router: Router) -> None:
    policy = cluster.prefill.roles[Role.PREFILL]
    pump(*cluster.loops, router=router, until=lambda: not policy.transfers)
    for loop in cluster.loops:
        assert_all_free(loop)
        for each in loop.roles.values():  # the roles not serving hold nothing either
            for attr in ("leases", "transfers", "preparing", "queued"):
                assert not getattr(each, attr, None), (loop.name, attr)


def test_decode_switches_to_prefill_while_requests_decode(elastic, offline) -> None:
    cluster, router = elastic
    d0, d1 = cluster.decodes
    for rid, prompt in PROMPTS.items():
        router.send(cluster.prefill, rid, prompt, max_tokens=12)
    on_d1 = lambda: d1.core.scheduler.requests  # noqa: E731
    pump(*cluster.loops, router=router, until=lambda: bool(on_d1()) and not d1.policy.leases)
    # The actuator: P chooses D1 no more, then D1 drains and switches.
    cluster.prefill.policy.set_decodes([cluster.info(d0)])
    done = cluster.switch(d1, Role.PREFILL)
    router.send(cluster.prefill, "late", PROMPTS["b"], max_tokens=12)  # only D0 may take it
    pump(*cluster.loops, router=router, until=done.done)
    outcome = done.result()
    assert outcome["switched"] and outcome["role"] == "prefill" and outcome["moved"] == 0
    assert d1.policy.role is Role.PREFILL and d1.core.scheduler.role is Role.PREFILL
    # Re-announce: D1 is a prefill instance with its own messager, sending KV to D0.
    cluster.connect_prefill(d1, [d0])
    router.send(d1, "on-new-p", PROMPTS["c"], max_tokens=12)
    rids = [*PROMPTS, "late", "on-new-p"]
    pump(*cluster.loops, router=router, until=finished(router, *rids))
    for rid in rids:
        prompt = PROMPTS.get(rid, PROMPTS["b"] if rid == "late" else PROMPTS["c"])
        assert router.tokens(rid) == offline(prompt, 12), rid
        assert router.finish(rid).finish_reason == "length", rid
    assert router.items["late"][0].decode_instance == d0.name
    assert router.items["on-new-p"][0].decode_instance == d0.name
    settle(cluster, router)
    pump(d1, router=router, until=lambda: not d1.roles[Role.PREFILL].transfers)


def test_prefill_switches_to_decode_after_its_prefills(elastic, offline) -> None:
    cluster, router = elastic
    p0, (d0, d1) = cluster.prefill, cluster.decodes
    # D1 becomes the prefill instance first, so that P0 can then become a decode instance.
    cluster.connect_prefill(d1, [d0])
    pump(d1, until=cluster.switch(d1, Role.PREFILL).done)
    router.send(p0, "mid", list(range(100, 200)), max_tokens=8)  # two prefill chunks
    computed = lambda: getattr(p0.core.scheduler.requests.get("mid"), "num_computed_tokens", 0)  # noqa: E731
    pump(p0, d0, router=router, until=lambda: computed() > 0)  # mid-prefill
    done = cluster.switch(p0, Role.DECODE)
    pump(p0, d0, d1, router=router, until=done.done)
    assert done.result()["switched"]
    assert router.finish("mid") is None or router.finish("mid").finish_reason == "length"
    # P0 is a decode instance now: the new prefill instance sends it KV.
    cluster.connect_prefill(d1, [d0, p0])
    d1.roles[Role.PREFILL].set_decodes([cluster.info(p0)])
    router.send(d1, "to-p0", PROMPTS["a"], max_tokens=8)
    pump(*cluster.loops, router=router, until=finished(router, "mid", "to-p0"))
    assert router.tokens("mid") == offline(list(range(100, 200)), 8)
    assert router.tokens("to-p0") == offline(PROMPTS["a"], 8)
    assert router.items["to-p0"][-1].decode_instance is None  # D's items carry no decode name
    assert any(i.first_index > 0 for i in router.items["to-p0"])
    pump(*cluster.loops, until=lambda: not d1.policy.transfers)
    for loop in cluster.loops:
        assert_all_free(loop)


def test_drain_deadline_hands_decoding_requests_back(elastic) -> None:
    cluster, router = elastic
    d1 = cluster.decodes[1]
    cluster.prefill.policy.set_decodes([cluster.info(d1)])
    router.send(cluster.prefill, "long", PROMPTS["a"], max_tokens=200)
    pump(*cluster.loops, router=router, until=lambda: bool(d1.core.scheduler.running))
    done = cluster.switch(d1, Role.PREFILL, drain_s=0.0)
    pump(*cluster.loops, router=router, until=done.done)
    outcome = done.result()
    assert outcome["switched"] and outcome["moved"] == 1
    finish = router.finish("long")
    assert finish.finish_reason == "error" and "continued elsewhere" in finish.error
    settle(cluster, router)


def test_misrouted_work_is_answered_not_dropped(elastic) -> None:
    cluster, router = elastic
    d0, d1 = cluster.decodes
    pump(d1, until=cluster.switch(d1, Role.PREFILL).done)
    router.send(d0, "to-a-decode", PROMPTS["a"])  # a GenerateRequest at a decode instance
    pump(d0, router=router, until=finished(router, "to-a-decode"))
    assert "serves as decode" in router.finish("to-a-decode").error
    # A DecodeTask reaching an instance that no longer decodes is refused; P asks the next.
    cluster.prefill.policy.set_decodes([cluster.info(d1), cluster.info(d0)])
    router.send(cluster.prefill, "a", PROMPTS["a"])
    pump(*cluster.loops, router=router, until=finished(router, "a"))
    assert router.finish("a").finish_reason == "length"
    assert d1.counters["misrouted_messages"] >= 1 or router.items["a"][0].decode_instance == d0.name
    settle(cluster, router)


def test_a_switch_it_cannot_make_is_refused(elastic, tiny_model) -> None:
    cluster, _ = elastic
    cluster.switch(cluster.decodes[0], Role.PREFILL)
    with pytest.raises(ValueError, match="already switching"):
        cluster.switch(cluster.decodes[0], Role.MIXED)
    fixed = make_loop(Role.DECODE, 5, make_config(tiny_model))  # elastic off: one role only
    try:
        with pytest.raises(ValueError, match="cannot serve as prefill"):
            start_switch(fixed, Role.PREFILL, 1.0, 2.0, True)
    finally:
        fixed.close()


def test_a_switch_that_cannot_drain_is_called_off_and_frees_nothing_early(elastic) -> None:
    cluster, router = elastic
    d1 = cluster.decodes[1]
    answers = Inbox(HOST, accept=(DecodeAllocation,))
    try:
        # A lease whose KV never comes (no P writes it): the drain cannot finish.
        task = DecodeTask("held", PROMPTS["a"], SamplingParams(), [], answers.address, "")
        router.senders.send(d1.inbox.address, task)
        pump(d1, until=lambda: bool(d1.policy.leases))
        done = start_switch(d1, Role.PREFILL, 0.0, 0.0, True)
        pump(d1, until=done.done)
        outcome = done.result()
        assert not outcome["switched"] and outcome["role"] == "decode"
        assert "did not drain" in outcome["reason"]
        assert d1.policy.role is Role.DECODE and d1.switching is None
        assert d1.counters["switches_called_off"] == 1
        assert "held" in d1.policy.leases  # its blocks wait for KvComplete or the lease
        router.senders.send(d1.inbox.address, CancelDecode("held", "test over"))
        pump(d1, until=lambda: not d1.policy.leases)
        assert_all_free(d1)
    finally:
        answers.close()


def test_decode_to_mixed_and_back(elastic, offline) -> None:
    cluster, router = elastic
    d1 = cluster.decodes[1]
    pump(d1, until=cluster.switch(d1, Role.MIXED).done)
    assert d1.policy.role is Role.MIXED
    router.send(d1, "colocated", PROMPTS["c"], max_tokens=8)
    pump(d1, router=router, until=finished(router, "colocated"))
    assert router.tokens("colocated") == offline(PROMPTS["c"], 8)
    done = cluster.switch(d1, Role.DECODE)
    pump(d1, until=done.done)
    assert done.result()["switched"] and d1.policy.role is Role.DECODE
    assert_all_free(d1)
