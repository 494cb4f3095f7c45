"""The elastic policy: which instances switch, when, and why (plain data, no Ray)."""

from __future__ import annotations

from cluster.config import ElasticConfig, SloConfig
from cluster.elastic.policy import DecisionKind, ElasticPolicy, InstanceView, Snapshot
from cluster.elastic.slo_window import SloView
from engine.config import Role

P, D = Role.PREFILL, Role.DECODE


def policy(**elastic) -> ElasticPolicy:
    base = {"enabled": True, "hysteresis": 2, "cooldown_s": 10.0}
    return ElasticPolicy(ElasticConfig(**{**base, **elastic}), SloConfig(attainment_target=0.9))


def cluster(prefill: list[dict], decode: list[dict]) -> tuple[InstanceView, ...]:
    views = [InstanceView(f"p{i}", P, **kw) for i, kw in enumerate(prefill)]
    views += [InstanceView(f"d{i}", D, **kw) for i, kw in enumerate(decode)]
    return tuple(views)


PREFILL_SHORT = cluster(
    [{"backlog_tokens": 20000, "busy": 1.0}] * 2,
    [{"kv_usage": 0.2, "running": 3}, {"kv_usage": 0.1, "running": 1}, {"kv_usage": 0.2}],
)
DECODE_SHORT = cluster(
    [{"busy": 0.3}, {"busy": 0.2}, {"busy": 0.1}],
    [{"kv_usage": 0.95, "running": 60}] * 2,
)
TTFT_MISSED = SloView(finished=50, ttft_attainment=0.5, tpot_attainment=1.0)
TPOT_MISSED = SloView(finished=50, ttft_attainment=1.0, tpot_attainment=0.4)


def test_prefill_short_takes_the_least_loaded_decode_after_hysteresis() -> None:
    pol = policy()
    assert pol.decide(Snapshot(0.0, PREFILL_SHORT, TTFT_MISSED)) == []  # seen once: not yet
    (decision,) = pol.decide(Snapshot(2.0, PREFILL_SHORT, TTFT_MISSED))
    assert decision.kind is DecisionKind.SWITCH
    assert (decision.instance, decision.from_role, decision.to_role) == ("d2", D, P)
    assert "prefill is short" in decision.reason and "backlog 20000" in decision.reason


def test_decode_short_takes_prefill_instances_that_are_spare() -> None:
    pol = policy(max_switch_fraction=1.0)
    pol.decide(Snapshot(0.0, DECODE_SHORT, TPOT_MISSED))
    decisions = pol.decide(Snapshot(2.0, DECODE_SHORT, TPOT_MISSED))
    assert decisions and all(d.to_role is D and d.from_role is P for d in decisions)
    assert decisions[0].instance == "p0"  # no backlog anywhere: by load, then name
    # The prefill left must not go over prefill_busy_high (0.6 busy over what remains).
    assert len(decisions) <= 2
    assert "decode is short" in decisions[0].reason


def test_cooldown_holds_the_next_switch_back() -> None:
    pol = policy(hysteresis=1, cooldown_s=10.0)
    assert len(pol.decide(Snapshot(0.0, PREFILL_SHORT, TTFT_MISSED))) == 1
    assert pol.decide(Snapshot(5.0, PREFILL_SHORT, TTFT_MISSED)) == []
    assert len(pol.decide(Snapshot(10.5, PREFILL_SHORT, TTFT_MISSED))) == 1


def test_a_flapping_signal_never_switches() -> None:
    pol = policy(hysteresis=2)
    for step in range(10):
        views, slo = (PREFILL_SHORT, TTFT_MISSED) if step % 2 == 0 else (DECODE_SHORT, TPOT_MISSED)
        assert pol.decide(Snapshot(2.0 * step, views, slo)) == []


def test_minimums_are_kept() -> None:
    views = cluster([{"backlog_tokens": 50000, "busy": 1.0}], [{"kv_usage": 0.0}] * 2)
    pol = policy(hysteresis=1, min_decode_instances=2)
    assert pol.decide(Snapshot(0.0, views, TTFT_MISSED)) == []


def test_no_switch_that_would_fill_the_remaining_decode_instances() -> None:
    views = cluster([{"backlog_tokens": 50000, "busy": 1.0}], [{"kv_usage": 0.6}] * 2)
    pol = policy(hysteresis=1)
    assert pol.decide(Snapshot(0.0, views, TTFT_MISSED)) == []  # 1.2 on one D > 0.85


def test_both_short_adds_an_instance_only_with_autoscale_and_room() -> None:
    views = cluster(
        [{"backlog_tokens": 50000, "busy": 1.0}] * 2, [{"kv_usage": 0.95, "running": 9}] * 2
    )
    slo = SloView(finished=50, ttft_attainment=0.2, tpot_attainment=0.5)
    assert policy(hysteresis=1).decide(Snapshot(0.0, views, slo, can_add=True)) == []
    pol = policy(hysteresis=1, autoscale=True)
    assert pol.decide(Snapshot(0.0, views, slo, can_add=False)) == []
    (decision,) = pol.decide(Snapshot(20.0, views, slo, can_add=True))
    assert decision.kind is DecisionKind.ADD and decision.to_role is P


def test_idle_instances_are_removed_after_the_idle_time_down_to_the_minimum() -> None:
    views = cluster([{}] * 2, [{}] * 1)
    pol = policy(autoscale=True, scale_down_idle_s=60.0)
    good = SloView(finished=10)
    assert pol.decide(Snapshot(0.0, views, good)) == []
    assert pol.decide(Snapshot(30.0, views, good)) == []
    (decision,) = pol.decide(Snapshot(61.0, views, good))
    assert decision.kind is DecisionKind.REMOVE and decision.instance == "p0"
    remaining = tuple(v for v in views if v.name != "p0")
    assert pol.decide(Snapshot(200.0, remaining, good)) == []  # p1 and d0 are the minimums


def test_only_removable_instances_are_removed() -> None:
    views = cluster([{}] * 2, [{}] * 2)
    pol = policy(autoscale=True, scale_down_idle_s=60.0)
    good = SloView(finished=10)
    assert pol.decide(Snapshot(0.0, views, good, removable=frozenset({"d1"}))) == []
    (decision,) = pol.decide(Snapshot(61.0, views, good, removable=frozenset({"d1"})))
    assert decision.instance == "d1"
    assert pol.decide(Snapshot(200.0, views, good, removable=frozenset())) == []


def test_a_failed_instance_below_the_minimum_is_refilled_at_once() -> None:
    views = cluster([{"busy": 0.5}, {"busy": 0.1}], [])  # the only D failed
    (decision,) = policy(hysteresis=5).decide(Snapshot(0.0, views, SloView()))
    assert (decision.instance, decision.to_role) == ("p0", D)
    assert "under its minimum" in decision.reason


def test_instances_being_switched_are_neither_counted_nor_chosen() -> None:
    views = (*PREFILL_SHORT[:-1], InstanceView("d2", D, available=False))
    pol = policy(hysteresis=1)
    (decision,) = pol.decide(Snapshot(0.0, views, TTFT_MISSED))
    assert decision.instance == "d1"


def test_mixed_instances_are_left_alone() -> None:
    views = (InstanceView("m0", Role.MIXED, backlog_tokens=99999, busy=1.0),)
    assert policy(hysteresis=1).decide(Snapshot(0.0, views, TTFT_MISSED)) == []


def test_decisions_describe_themselves() -> None:
    pol = policy(hysteresis=1)
    (decision,) = pol.decide(Snapshot(0.0, PREFILL_SHORT, TTFT_MISSED))
    assert decision.describe().startswith("switch d2 decode -> prefill: prefill is short")
