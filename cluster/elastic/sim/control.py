"""The elastic controller in the simulator: the real `ElasticPolicy`, fed every decision interval
with the same figures the instances report, and role switches carried out the way the product
does them: stop admitting work for the old role, let what is in flight finish (decoding
requests still running after `elastic.drain_timeout_s` move to another decode instance, paying
for their KV's transfer), take `switch_s` to change role and re-announce, resume.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.elastic.policy import Decision, DecisionKind, ElasticPolicy, InstanceView, Snapshot
from cluster.elastic.sim.cluster import SimCluster
from cluster.elastic.sim.instance import TOKEN, SimInstance, engine_request
from engine.config import Role
from engine.request import RequestStatus


@dataclass
class Timeline:
    """What happened over time: role counts at each decision, every decision, switch times."""

    roles: list[tuple[float, int, int, int]] = field(default_factory=list)  # (t, P, D, switching)
    decisions: list[Decision] = field(default_factory=list)
    switch_seconds: list[float] = field(default_factory=list)  # stop admitting -> serving
    migrated: int = 0


class SimController:
    def __init__(self, cluster: SimCluster, enabled: bool, max_instances: int = 0) -> None:
        self.cluster = cluster
        config = cluster.config
        self.policy = ElasticPolicy(config.elastic, config.slo)
        self.interval = config.elastic.decision_interval_s
        self.enabled = enabled
        self.max_instances = max_instances
        self.timeline = Timeline()
        self._busy_seen: dict[str, float] = {}
        self._switch_started: dict[str, float] = {}
        self._removing: set[str] = set()
        cluster.on_idle.append(self._maybe_drained)
        cluster.clock.at(0.0, self._tick)

    def _tick(self) -> None:
        cluster = self.cluster
        snap = self.snapshot()
        self._log_roles()
        if self.enabled:
            for decision in self.policy.decide(snap):
                self.apply(decision)
        if cluster.unfinished:
            cluster.clock.after(self.interval, self._tick)

    def snapshot(self) -> Snapshot:
        views = []
        for inst in self.cluster.instances.values():
            if not inst.alive:
                continue
            busy = (inst.busy_s - self._busy_seen.get(inst.name, 0.0)) / self.interval
            self._busy_seen[inst.name] = inst.busy_s
            sched = inst.scheduler
            views.append(
                InstanceView(
                    name=inst.name,
                    role=inst.role,
                    running=len(sched.running),
                    waiting=len(sched.waiting)
                    + len(inst.prepare_queue)
                    + sched.num_with_status(RequestStatus.WAITING_FOR_KV),
                    backlog_tokens=inst.backlog_tokens(),
                    kv_usage=inst.kv_usage(),
                    slots=sched.config.max_num_seqs,
                    busy=min(1.0, busy),
                    available=inst.accepting and inst.switching_to is None,
                )
            )
        alive = sum(i.alive for i in self.cluster.instances.values())
        can_add = self.max_instances > alive
        return Snapshot(
            self.cluster.clock.now,
            tuple(views),
            self.cluster.window.view(self.cluster.clock.now),
            can_add,
        )

    # ------------------------------------------------------------------ decisions
    def apply(self, decision: Decision) -> None:
        self.timeline.decisions.append(decision)
        if decision.kind is DecisionKind.SWITCH:
            self.switch(self.cluster.instances[decision.instance], decision.to_role)
        elif decision.kind is DecisionKind.ADD:
            clock = self.cluster.clock
            clock.after(self.cluster.settings.startup_s, lambda: self._added(decision.to_role))
        else:
            inst = self.cluster.instances[decision.instance]
            inst.accepting = False
            self.cluster.endpoints_changed()
            self._removing.add(inst.name)
            self._switch_started[inst.name] = self.cluster.clock.now
            self._maybe_drained(inst)

    def _added(self, role: Role) -> None:
        self.cluster.add_instance(role)
        self.cluster.endpoints_changed()

    def switch(self, inst: SimInstance, to_role: Role) -> None:
        """Stop admitting work for the old role; the switch completes once drained."""
        if not inst.alive or inst.switching_to is not None:
            return
        inst.accepting = False
        inst.switching_to = to_role
        self._switch_started[inst.name] = self.cluster.clock.now
        self.cluster.endpoints_changed()
        if inst.role is Role.DECODE:
            timeout = self.cluster.config.elastic.drain_timeout_s
            self.cluster.clock.after(timeout, lambda: self._migrate(inst))
        self._maybe_drained(inst)

    def _maybe_drained(self, inst: SimInstance) -> None:
        started = self._switch_started.get(inst.name)
        if started is None or not inst.holds_nothing():
            return
        del self._switch_started[inst.name]
        if inst.name in self._removing:
            self._removing.discard(inst.name)
            inst.alive = False
            self.cluster.endpoints_changed()
            return
        if inst.switching_to is None:
            return  # crashed and restarted while draining: the switch is off
        clock = self.cluster.clock
        clock.after(self.cluster.settings.switch_s, lambda: self._switched(inst, started))

    def _switched(self, inst: SimInstance, started: float) -> None:
        if not inst.alive or inst.switching_to is None:
            return  # crashed while switching; the restart brings it back in its old role
        inst.set_role(inst.switching_to)
        inst.switching_to = None
        inst.accepting = True
        self.timeline.switch_seconds.append(self.cluster.clock.now - started)
        self.cluster.endpoints_changed()

    def _migrate(self, inst: SimInstance) -> None:
        """Drain timed out: move each decoding request to another decode instance (its KV
        is written there as a prompt's would be; the request goes on where it was)."""
        if inst.switching_to is None or not inst.alive:
            return
        cluster = self.cluster
        for rid, request in list(inst.tracked.items()):
            engine_req = inst.scheduler.requests.get(rid)
            if engine_req is None or engine_req.status is not RequestStatus.RUNNING:
                continue
            targets = sorted(
                cluster.serving(Role.DECODE), key=lambda d: -d.block_manager.num_free_blocks
            )
            if not targets:
                break
            target = targets[0]
            request.attempt += 1  # a new id on the new instance, as a migration has for real
            context = request.sim_prompt + request.sim_out - 1
            moved = engine_request(request, context, request.sim_output - request.sim_out + 1)
            if not target.scheduler.reserve_remote(moved):
                request.attempt -= 1  # stays here; the drain goes on
                continue
            inst.scheduler.abort_request(rid)
            del inst.tracked[rid]
            target.tracked[moved.request_id] = request
            request.decode = target.name
            self.timeline.migrated += 1
            real_tokens = context * cluster.settings.quantum
            seconds = cluster.cost.transfer_fixed_s * cluster.cost.num_layers + (
                real_tokens * cluster.cost.kv_bytes_per_token / cluster.cost.transfer_bytes_per_s
            )
            cluster.clock.after(seconds, lambda t=target, m=moved.request_id: self._arrived(t, m))
        cluster.kick(inst)

    def _arrived(self, target: SimInstance, rid: str) -> None:
        if target.alive and rid in target.tracked:
            target.scheduler.start_remote(rid, TOKEN)
            self.cluster.kick(target)

    def _log_roles(self) -> None:
        alive = [i for i in self.cluster.instances.values() if i.alive]
        switching = sum(i.switching_to is not None for i in alive)
        prefill = sum(i.role is Role.PREFILL and i.switching_to is None for i in alive)
        decode = sum(i.role is Role.DECODE and i.switching_to is None for i in alive)
        self.timeline.roles.append((self.cluster.clock.now, prefill, decode, switching))
