"""The controller: stats in, decisions carried out by an actuator, logged, counted."""

from __future__ import annotations

import threading

import pytest

from cluster.config import parse_config
from cluster.elastic.controller import ElasticController
from engine.config import Role

BUSY_PREFILL = {"backlog_tokens": 30000, "busy_s": 0.0, "running": 1}


class Cluster:
    """A stand-in deployment: stats as instances report them, switches that take effect when
    the test lets them (`gate`)."""

    def __init__(self) -> None:
        self.roles = {"p0": "prefill", "p1": "prefill", "d0": "decode", "d1": "decode"}
        self.clock = 0.0
        self.gate = threading.Event()
        self.gate.set()
        self.switched: list[tuple[str, Role]] = []
        self.fail_next = False
        self.switchable = True
        self.room = False
        self.added: list[str] = []
        self.removed: list[str] = []

    def collect(self):
        router = {"slo": {"finished": 40, "ttft_attainment": 0.3, "tpot_attainment": 1.0}}
        stats = []
        for name, role in self.roles.items():
            s = {"name": name, "role": role, "num_blocks": 100, "free_blocks": 90}
            if role == "prefill":
                s |= {**BUSY_PREFILL, "busy_s": self.clock}  # busy all the time
            stats.append(s)
        stats.append({"name": "d9", "error": "RayActorError"})  # a dead one is left out
        return router, stats

    def switch(self, name: str, role: Role) -> None:
        assert self.gate.wait(10)
        if self.fail_next:
            raise RuntimeError("drain timed out")
        self.roles[name] = role.value
        self.switched.append((name, role))

    def can_switch(self) -> bool:
        return self.switchable

    def add(self, role: Role) -> str:
        assert self.gate.wait(10)
        name = f"{role.value[0]}{len(self.roles)}"
        self.roles[name] = role.value
        self.added.append(name)
        return name

    def remove(self, name: str) -> None:
        del self.roles[name]
        self.removed.append(name)

    def can_add(self) -> bool:
        return self.room

    def removable(self) -> set[str]:
        return set(self.added) - set(self.removed)


def controller(cluster: Cluster, **elastic) -> ElasticController:
    config = parse_config(
        {
            "prefill": {"instances": 2},
            "decode": {"instances": 2},
            "elastic": {"enabled": True, "hysteresis": 1, "cooldown_s": 0, **elastic},
        }
    )
    return ElasticController(config, cluster, clock=lambda: cluster.clock)


def settle(ctl: ElasticController) -> None:
    ctl._pool.shutdown(wait=True)  # every action ran
    ctl.drain_outcomes()


def test_a_decision_is_carried_out_logged_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    cluster = Cluster()
    ctl = controller(cluster)
    (decision,) = ctl.step()
    assert (decision.instance, decision.to_role) == ("d0", Role.PREFILL)
    settle(ctl)
    assert cluster.switched == [("d0", Role.PREFILL)]
    stats = ctl.stats()
    assert stats["counters"]["decided_switch_decode_to_prefill"] == 1
    assert stats["counters"]["switch_done"] == 1
    (record,) = stats["decisions"]
    assert record["outcome"] == "done" and "prefill is short" in record["reason"]
    assert "elastic: switch d0 decode -> prefill" in caplog.text


def test_an_instance_in_a_switch_is_not_chosen_again() -> None:
    cluster = Cluster()
    cluster.gate.clear()  # the switch hangs until released
    ctl = controller(cluster, min_decode_instances=1)
    (first,) = ctl.step()
    cluster.clock = 2.0
    assert ctl.step() == []  # d1 is the last decode instance once d0 has switched
    assert ctl.stats()["busy"] == [first.instance]
    cluster.gate.set()
    settle(ctl)


def test_a_failed_switch_is_recorded_and_the_instance_chosen_again() -> None:
    cluster = Cluster()
    cluster.fail_next = True
    ctl = controller(cluster)
    ctl.step()
    settle(ctl)
    stats = ctl.stats()
    assert stats["counters"]["switch_failed"] == 1
    assert stats["decisions"][0]["outcome"].startswith("failed: RuntimeError: drain timed out")
    assert stats["busy"] == []


def test_disabled_it_only_watches() -> None:
    cluster = Cluster()
    ctl = controller(cluster, enabled=False)
    for t in range(5):
        cluster.clock = 2.0 * t
        assert ctl.step() == []


def test_an_operator_can_force_a_switch_with_the_loop_running() -> None:
    cluster = Cluster()
    ctl = controller(cluster, enabled=False, decision_interval_s=0.05)
    ctl.start()
    try:
        ctl.force_switch("p1", "decode")
        for _ in range(200):
            if ctl.stats()["counters"].get("switch_done"):
                break
            threading.Event().wait(0.05)
        assert cluster.switched == [("p1", Role.DECODE)]
        assert ctl.stats()["decisions"][0]["reason"] == "forced by an operator"
    finally:
        ctl.stop()


def test_without_switchable_instances_it_only_advises() -> None:
    cluster = Cluster()
    cluster.switchable = False
    ctl = controller(cluster)
    assert len(ctl.step()) == 1
    settle(ctl)
    assert cluster.switched == [] and ctl.stats()["busy"] == []
    (record,) = ctl.stats()["decisions"]
    assert record["outcome"].startswith("advice: not carried out")
    assert ctl.stats()["counters"]["advice_only"] == 1


def busy_everywhere(cluster: Cluster):
    """Prefill backlogged and decode KV full, both SLO bounds missed: only adding helps."""
    router = {"slo": {"finished": 40, "ttft_attainment": 0.3, "tpot_attainment": 0.3}}
    stats = []
    for name, role in cluster.roles.items():
        s = {"name": name, "role": role, "num_blocks": 100, "free_blocks": 2, "running": 9}
        if role == "prefill":
            s |= {**BUSY_PREFILL, "busy_s": cluster.clock}
        stats.append(s)
    return router, stats


def test_an_add_is_carried_out_once_at_a_time_and_names_the_new_instance() -> None:
    cluster = Cluster()
    cluster.room = True
    cluster.collect = lambda: busy_everywhere(cluster)
    cluster.gate.clear()  # the add hangs until released
    ctl = controller(cluster, autoscale=True)
    (decision,) = ctl.step()
    assert decision.kind.value == "add"
    cluster.clock = 2.0
    assert ctl.step() == []  # one add in flight: no other is decided
    cluster.gate.set()
    settle(ctl)
    stats = ctl.stats()
    assert stats["counters"]["add_done"] == 1 and cluster.added == ["p4"]
    assert stats["decisions"][0]["instance"] == "p4"


def test_only_instances_it_added_are_removed_when_idle() -> None:
    cluster = Cluster()
    cluster.added = ["d1"]  # as if added earlier; p0, p1 and d0 are the config's
    cluster.collect = lambda: (
        {"slo": {"finished": 40, "ttft_attainment": 1.0, "tpot_attainment": 1.0}},
        [
            {"name": n, "role": r, "num_blocks": 100, "free_blocks": 100}
            for n, r in cluster.roles.items()
        ],
    )
    ctl = controller(cluster, autoscale=True, scale_down_idle_s=5.0)
    assert ctl.step() == []
    cluster.clock = 6.0
    (decision,) = ctl.step()
    assert (decision.kind.value, decision.instance) == ("remove", "d1")
    settle(ctl)
    cluster.clock = 20.0
    assert ctl.step() == []  # p1 is idle as long, but the config started it
    assert cluster.removed == ["d1"] and ctl.stats()["counters"]["remove_done"] == 1
