"""Switching an instance's role while it serves (elastic prefill/decode), on its loop.

A switchable instance holds a policy for every role it may take (`InstanceLoop.roles`), all
built at start-up around one KV cache, so a switch compiles and allocates nothing. A switch:
1. stops admitting new work of the old role: a decode instance refuses new `DecodeTask`s
   ("switching roles"; P asks the next D). The router and the prefill instances have already
   been told to send it none (the actuator does that first); a prefill instance still serves
   the stragglers that were on their way;
2. drains: every request of the old role finishes (scheduler empty, the role's leases,
   preparations and transfers over, no step in flight). At `drain_timeout_s` the requests that
   can leave now are ended with an error the router acts on (`RolePolicy.movable`: decoding
   requests move to another decode instance, queued prompts go to another prefill instance;
   `router.migrate_on_failure`), and the switch waits only for what has its own deadline (KV
   in flight under D's lease or P's transfer timeout);
3. swaps: the scheduler takes the new role's batching, the loop holds the new policy, the old
   one lets go of what it alone used (`deactivate`);
4. answers the caller, who re-announces the instance in its new role. Past `give_up_s` without
   a drain the switch is called off: the instance goes on in its old role and says so.
Messages of a role the instance no longer serves are answered so their senders go on: a
`GenerateRequest` ends with an error (the router retries it elsewhere), a `DecodeTask` is
refused; anything else is counted and dropped.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from engine.config import Role
from engine.protocol.requests import AbortRequest, GenerateRequest
from engine.protocol.splitwise import DecodeAllocation, DecodeTask
from engine.protocol.tokens import TokenBatch, TokenItem

if TYPE_CHECKING:
    from cluster.instances.loop import InstanceLoop

log = logging.getLogger(__name__)


@dataclass
class SwitchOutcome:
    switched: bool
    role: str  # the role the instance serves now
    reason: str = ""  # why it did not switch
    moved: int = 0  # requests handed back at the drain deadline
    seconds: float = 0.0  # stop admitting -> serving in the new role


@dataclass
class RoleSwitch:
    target: Role
    started: float  # monotonic
    drain_deadline: float
    give_up_at: float
    move_on_deadline: bool
    future: Future
    moved: int = 0


def start_switch(
    loop: InstanceLoop, role: Role, drain_timeout_s: float, give_up_s: float, move: bool
) -> Future:
    """On the loop: begin a switch to `role`; the future resolves to a `SwitchOutcome` dict.
    A switch to the role it serves resolves at once; one it cannot make raises ValueError."""
    future: Future = Future()
    if loop.switching is not None:
        raise ValueError(f"{loop.name} is already switching to {loop.switching.target.value}")
    if role not in loop.roles:
        can = sorted(r.value for r in loop.roles) or "none (elastic.enabled is off)"
        raise ValueError(f"{loop.name} cannot serve as {role.value}; roles it can take: {can}")
    if loop.roles[role].scheduler.block_size != loop.core.block_manager.block_size:
        raise ValueError(f"{role.value}'s block size differs from {loop.name}'s KV cache")
    if role is loop.policy.role:
        future.set_result(asdict(SwitchOutcome(True, role.value)))
        return future
    now = time.monotonic()
    loop.switching = RoleSwitch(
        role, now, now + drain_timeout_s, now + max(give_up_s, drain_timeout_s), move, future
    )
    loop.counters["switches_started"] += 1
    log.warning("%s: switching %s -> %s", loop.name, loop.policy.role.value, role.value)
    return future


def advance_switch(loop: InstanceLoop) -> None:
    """Every iteration while switching: swap once nothing of the current role is left (no
    request, no step in flight, nothing held), hand back at the deadline, call off past the
    last one."""
    switch = loop.switching
    assert switch is not None
    core, now = loop.core, time.monotonic()
    if not core.scheduler.requests and core.in_flight is None and not loop.policy.in_flight():
        _swap(loop, switch.target)
        _resolve(loop, switch, SwitchOutcome(True, switch.target.value))
    elif now > switch.give_up_at:
        loop.counters["switches_called_off"] += 1
        why = f"the {loop.policy.role.value} work did not drain in time"
        log.error("%s: switch to %s called off: %s", loop.name, switch.target.value, why)
        _resolve(loop, switch, SwitchOutcome(False, loop.policy.role.value, why))
    elif now > switch.drain_deadline and switch.move_on_deadline:
        why = f"{loop.name} is switching to {switch.target.value}; continued elsewhere"
        movable = loop.policy.movable()
        for request_id in movable:
            loop.fail_request(request_id, why)
        switch.moved += len(movable)
        loop.counters["moved_on_switch"] += len(movable)


def _swap(loop: InstanceLoop, target: Role) -> None:
    policy = loop.roles[target]
    loop.core.scheduler.switch_role(target, policy.scheduler)
    loop.core.overlap = policy.overlap
    loop.policy.deactivate()
    if loop.clients:  # every request has ended: what is left are records of ended ones
        log.warning("%s: forgetting %d stale clients on switching", loop.name, len(loop.clients))
        loop.clients.clear()
    loop.policy = policy
    loop.counters["switches_done"] += 1


def _resolve(loop: InstanceLoop, switch: RoleSwitch, outcome: SwitchOutcome) -> None:
    loop.switching = None
    outcome.moved, outcome.seconds = switch.moved, time.monotonic() - switch.started
    if outcome.switched:
        log.warning("%s: serves as %s after %.2f s", loop.name, outcome.role, outcome.seconds)
    switch.future.set_result(asdict(outcome))


def refuse_misrouted(loop: InstanceLoop, msg: Any) -> bool:
    """Answer a message this instance does not take now (its role changed, or it is draining
    a decode role); True if it was answered here, False to handle it as usual."""
    if isinstance(msg, AbortRequest):
        return False
    draining_decode = loop.switching is not None and loop.policy.role is Role.DECODE
    if isinstance(msg, loop.policy.accepts) and not (
        draining_decode and isinstance(msg, DecodeTask)
    ):
        return False
    loop.counters["misrouted_messages"] += 1
    if isinstance(msg, DecodeTask):
        free = loop.core.block_manager.num_free_blocks
        refusal = DecodeAllocation(msg.request_id, loop.name, False, [], "switching roles", free)
        loop.send(msg.reply_to, refusal, "allocation_send_failures")
    elif isinstance(msg, GenerateRequest):
        error = f"{loop.name} serves as {loop.policy.role.value} now; retry elsewhere"
        batch = TokenBatch(loop.name, [TokenItem.failed(msg.request_id, 0, error)])
        loop.send(msg.reply_to, batch, "router_send_failures")
    return True
