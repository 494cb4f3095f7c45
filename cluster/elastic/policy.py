"""The elastic controller's decisions, as a plain class: a snapshot in, decisions out.

No Ray, no torch, no clock of its own: the caller (the controller actor, or the simulator) hands
in what the router and the instances already report, with the time, every
`elastic.decision_interval_s`. The policy answers which instances to switch between prefill and
decode (or to add or remove), each with a reason a person can read in the log.

How it judges:
- prefill is short when its queue is long (mean backlog tokens per prefill instance over
  `prefill_backlog_high_tokens`) or when TTFT attainment is under target while the prefill
  instances are busy (mean busy fraction over `prefill_busy_high`);
- decode is short when its KV is nearly full (mean use over `decode_load_high`) or when TPOT
  attainment is under target;
- one side short and the other not: switch instances from the other side, as many as the
  imbalance asks for, at most `max_switch_fraction` of the donors, never below the donors'
  minimum, and never so many that the donors would become short themselves;
- both short: add an instance when autoscaling and the cluster has room; else nothing (a switch
  would only move the shortage);
- an imbalance must be seen in `hysteresis` consecutive decisions, and after acting the policy
  waits `cooldown_s`, so one noisy window never flips instances back and forth;
- a role under its minimum (an instance failed) is refilled at once from the other role.
Mixed instances are left alone (counted by nobody); an operator can still switch them by hand.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from cluster.config import ElasticConfig, SloConfig
from cluster.elastic.slo_window import SloView
from engine.config import Role


class DecisionKind(str, enum.Enum):
    SWITCH = "switch"  # an instance changes role
    ADD = "add"  # start a new instance in `to_role`
    REMOVE = "remove"  # stop an idle instance


@dataclass(frozen=True)
class InstanceView:
    """One instance as the controller sees it (from its stats())."""

    name: str
    role: Role
    running: int = 0
    waiting: int = 0  # requests queued for this role's work
    backlog_tokens: int = 0  # prompt tokens waiting for prefill here
    kv_usage: float = 0.0  # fraction of KV blocks in use
    slots: int = 0  # most requests it runs at once (max_num_seqs); 0: unknown
    busy: float = 0.0  # fraction of the last interval spent computing
    available: bool = True  # False while switching or starting: neither counted nor chosen

    @property
    def load(self) -> float:
        """Decode: the larger of KV use and batch slots taken (running + arriving)."""
        taken = (self.running + self.waiting) / self.slots if self.slots else 0.0
        return max(self.kv_usage, taken)

    @property
    def idle(self) -> bool:
        return self.running == 0 and self.waiting == 0 and self.backlog_tokens == 0


@dataclass(frozen=True)
class Snapshot:
    time_s: float
    instances: tuple[InstanceView, ...]
    slo: SloView = field(default_factory=SloView)
    can_add: bool = False  # the cluster has room for one more instance
    removable: frozenset[str] | None = None  # instances a removal may take (None: any)


@dataclass(frozen=True)
class Decision:
    kind: DecisionKind
    to_role: Role
    reason: str
    time_s: float
    instance: str | None = None  # None for ADD
    from_role: Role | None = None

    def describe(self) -> str:
        if self.kind is DecisionKind.SWITCH:
            source = f" {self.from_role.value}" if self.from_role else ""
            what = f"switch {self.instance}{source} -> {self.to_role.value}"
        elif self.kind is DecisionKind.ADD:
            what = f"add a {self.to_role.value} instance"
        else:
            what = f"remove {self.instance} ({self.to_role.value})"
        return f"{what}: {self.reason}"


@dataclass(frozen=True)
class Pressure:
    """What the snapshot says about each side; `why` holds the figures behind it."""

    prefill_short: bool
    decode_short: bool
    prefill_ratio: float  # how far over its bound prefill is (1.0 = at the bound)
    decode_ratio: float
    why: str


class ElasticPolicy:
    def __init__(self, elastic: ElasticConfig, slo: SloConfig) -> None:
        self.elastic = elastic
        self.slo = slo
        self._direction: Role | str | None = None  # what the last decisions pointed to
        self._streak = 0
        self._last_action_s = -math.inf
        self._idle_since: dict[str, float] = {}

    # ------------------------------------------------------------------ the decision
    def decide(self, snap: Snapshot) -> list[Decision]:
        self._track_idle(snap)
        prefill = _available(snap, Role.PREFILL)
        decode = _available(snap, Role.DECODE)
        refill = self._refill_minimum(snap, prefill, decode)
        if refill:
            self._act(snap.time_s)
            return refill
        pressure = self.assess(snap, prefill, decode)
        direction = _direction_of(pressure)
        self._streak = self._streak + 1 if direction == self._direction else 1
        self._direction = direction
        if direction is None:
            return self._scale_down(snap, prefill, decode)
        if self._streak < self.elastic.hysteresis:
            return []
        if snap.time_s - self._last_action_s < self.elastic.cooldown_s:
            return []
        if direction == "grow":
            decisions = self._grow(snap, pressure)
        elif direction is Role.PREFILL:
            decisions = self._to_prefill(snap, pressure, prefill, decode)
        else:
            decisions = self._to_decode(snap, pressure, prefill, decode)
        if decisions:
            self._act(snap.time_s)
        return decisions

    def assess(
        self, snap: Snapshot, prefill: list[InstanceView], decode: list[InstanceView]
    ) -> Pressure:
        e, target = self.elastic, self.slo.attainment_target
        backlog = _mean([p.backlog_tokens for p in prefill])
        busy = _mean([p.busy for p in prefill])
        load = _mean([d.load for d in decode])
        ttft_missed = snap.slo.finished > 0 and snap.slo.ttft_attainment < target
        tpot_missed = snap.slo.finished > 0 and snap.slo.tpot_attainment < target
        prefill_ratio = max(backlog / e.prefill_backlog_high_tokens, busy / e.prefill_busy_high)
        decode_ratio = load / e.decode_load_high
        prefill_short = bool(prefill) and (
            backlog > e.prefill_backlog_high_tokens or (ttft_missed and busy > e.prefill_busy_high)
        )
        decode_short = bool(decode) and (load > e.decode_load_high or tpot_missed)
        if tpot_missed:
            decode_ratio = max(decode_ratio, 1.0 + (target - snap.slo.tpot_attainment))
        why = (
            f"{len(prefill)}P {len(decode)}D, prefill backlog {backlog:.0f} tok/instance, "
            f"prefill busy {busy:.0%}, decode load {load:.0%}, TTFT attainment "
            f"{snap.slo.ttft_attainment:.0%}, TPOT attainment {snap.slo.tpot_attainment:.0%} "
            f"(target {target:.0%}, {snap.slo.finished} requests)"
        )
        return Pressure(prefill_short, decode_short, prefill_ratio, decode_ratio, why)

    # ------------------------------------------------------------------ the moves
    def _to_prefill(
        self,
        snap: Snapshot,
        pressure: Pressure,
        prefill: list[InstanceView],
        decode: list[InstanceView],
    ) -> list[Decision]:
        spare = len(decode) - self.elastic.min_decode_instances
        wanted = math.ceil(len(prefill) * (pressure.prefill_ratio - 1.0)) if prefill else 1
        count = min(max(1, wanted), self._step_limit(len(decode)), spare)
        # The decode instances left must hold what every decode instance holds now.
        used = sum(d.load for d in decode)
        while count > 0 and used / (len(decode) - count) > self.elastic.decode_load_high:
            count -= 1
        donors = sorted(decode, key=lambda d: (d.running + d.waiting, d.kv_usage, d.name))
        reason = f"prefill is short of capacity; {pressure.why}"
        return [_switch(d, Role.PREFILL, reason, snap.time_s) for d in donors[:count]]

    def _to_decode(
        self,
        snap: Snapshot,
        pressure: Pressure,
        prefill: list[InstanceView],
        decode: list[InstanceView],
    ) -> list[Decision]:
        spare = len(prefill) - self.elastic.min_prefill_instances
        wanted = math.ceil(len(decode) * (pressure.decode_ratio - 1.0)) if decode else 1
        count = min(max(1, wanted), self._step_limit(len(prefill)), spare)
        # The prefill instances left must not become short themselves.
        busy = sum(p.busy for p in prefill)
        backlog = sum(p.backlog_tokens for p in prefill)
        while count > 0 and (
            busy / (len(prefill) - count) > self.elastic.prefill_busy_high
            or backlog / (len(prefill) - count) > self.elastic.prefill_backlog_high_tokens / 2
        ):
            count -= 1
        donors = sorted(prefill, key=lambda p: (p.backlog_tokens, p.running + p.waiting, p.name))
        reason = f"decode is short of capacity; {pressure.why}"
        return [_switch(p, Role.DECODE, reason, snap.time_s) for p in donors[:count]]

    def _grow(self, snap: Snapshot, pressure: Pressure) -> list[Decision]:
        if not (self.elastic.autoscale and snap.can_add):
            return []
        role = Role.PREFILL if pressure.prefill_ratio >= pressure.decode_ratio else Role.DECODE
        reason = f"prefill and decode are both short; {pressure.why}"
        return [Decision(DecisionKind.ADD, role, reason, snap.time_s)]

    def _scale_down(
        self, snap: Snapshot, prefill: list[InstanceView], decode: list[InstanceView]
    ) -> list[Decision]:
        """Autoscale only: remove one (removable) instance idle for scale_down_idle_s."""
        now = snap.time_s
        if not self.elastic.autoscale or snap.slo.attainment < self.slo.attainment_target:
            return []
        minimum = {
            Role.PREFILL: (len(prefill), self.elastic.min_prefill_instances),
            Role.DECODE: (len(decode), self.elastic.min_decode_instances),
        }
        for view in sorted(snap.instances, key=lambda v: v.name):
            if snap.removable is not None and view.name not in snap.removable:
                continue
            since = self._idle_since.get(view.name)
            have, least = minimum.get(view.role, (0, 0))
            if since is not None and now - since >= self.elastic.scale_down_idle_s and have > least:
                self._idle_since.pop(view.name)
                self._act(now)
                reason = f"idle for {now - since:.0f} s and the SLO is met"
                return [Decision(DecisionKind.REMOVE, view.role, reason, now, view.name, view.role)]
        return []

    def _track_idle(self, snap: Snapshot) -> None:
        names = set()
        for view in snap.instances:
            names.add(view.name)
            if view.idle and view.available:
                self._idle_since.setdefault(view.name, snap.time_s)
            else:
                self._idle_since.pop(view.name, None)
        for gone in set(self._idle_since) - names:
            del self._idle_since[gone]

    def _refill_minimum(
        self, snap: Snapshot, prefill: list[InstanceView], decode: list[InstanceView]
    ) -> list[Decision]:
        """A role below its minimum (an instance failed) takes one from the other at once."""
        e = self.elastic
        switching = [v for v in snap.instances if not v.available]
        if switching:
            return []  # a switch in flight may be the refill already
        for short, donors, least, donor_least in (
            (Role.DECODE, prefill, e.min_decode_instances, e.min_prefill_instances),
            (Role.PREFILL, decode, e.min_prefill_instances, e.min_decode_instances),
        ):
            have = len(decode) if short is Role.DECODE else len(prefill)
            if have < least and len(donors) > donor_least:
                donor = min(donors, key=lambda v: (v.running + v.waiting, v.name))
                reason = f"{short.value} has {have} instances, under its minimum of {least}"
                return [_switch(donor, short, reason, snap.time_s)]
        return []

    def _step_limit(self, donors: int) -> int:
        return max(1, math.floor(donors * self.elastic.max_switch_fraction))

    def _act(self, now: float) -> None:
        self._last_action_s = now
        self._streak = 0
        self._direction = None


def _available(snap: Snapshot, role: Role) -> list[InstanceView]:
    return [v for v in snap.instances if v.role is role and v.available]


def _direction_of(pressure: Pressure) -> Role | str | None:
    if pressure.prefill_short and pressure.decode_short:
        return "grow"
    if pressure.prefill_short:
        return Role.PREFILL
    if pressure.decode_short:
        return Role.DECODE
    return None


def _switch(view: InstanceView, to_role: Role, reason: str, now: float) -> Decision:
    return Decision(DecisionKind.SWITCH, to_role, reason, now, view.name, view.role)


def _mean(values: list[float] | list[int]) -> float:
    return sum(values) / len(values) if values else 0.0
