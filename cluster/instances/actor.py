"""The Ray actor of every instance: one class; its name's role picks the policy its loop holds.

Ray runs the methods below on its own threads (`max_concurrency`); none touches the loop's
state. `connect`, `decode_down` and `stats` run on the loop (`InstanceLoop.call`, with a
deadline); `is_ready` and `heartbeat_age_s` read what the loop publishes.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from cluster.config import PdserveConfig, TransferBackendName
from cluster.instances.loop import InstanceLoop, RolePolicy
from cluster.instances.prefill_role import PrefillRole
from cluster.instances.roles import DecodeRole, MixedRole, build_core, shared_kv
from cluster.instances.switch import start_switch
from engine.config import Role
from engine.protocol.channels import node_ip_address
from engine.protocol.identity import InstanceId
from worker.engine_core import EngineCore

CALL_TIMEOUT_S = 10.0  # a loop busy longer than this with one step is stalled


def build_role(name: InstanceId, config: PdserveConfig, host: str) -> tuple[EngineCore, RolePolicy]:
    """The engine and the policy of `name.role` (the engine first where the policy needs it)."""
    if name.role is Role.PREFILL:
        prefill = PrefillRole(name, config, host)
        return prefill.build_core(config), prefill
    if name.role is Role.DECODE:
        # With the local backend the messager writing into D maps rank 0's cache: a shared store.
        local = config.transfer.backend is TransferBackendName.LOCAL
        store = shared_kv(config, Role.DECODE, name) if local else None
        core = build_core(config, Role.DECODE, name, store)
        return core, DecodeRole(name, config, core, host, store)
    return build_core(config, Role.MIXED, name), MixedRole(config)


def build_switchable(
    name: InstanceId, config: PdserveConfig, host: str
) -> tuple[EngineCore, dict[Role, RolePolicy]]:
    """Elastic: one engine around a KV cache its messager can map, with every role's policy
    ready on it (prefill, decode, mixed), so a switch builds nothing. The engine starts in
    `name.role`; the config guarantees that prefill and decode size the KV cache alike."""
    prefill = PrefillRole(name, config, host)
    core = prefill.build_core(config)
    roles: dict[Role, RolePolicy] = {
        Role.PREFILL: prefill,
        Role.DECODE: DecodeRole(name, config, core, host, store=prefill.kv, owns_store=False),
        Role.MIXED: MixedRole(config),
    }
    if config.mixed.engine.scheduler.block_size != core.block_manager.block_size:
        del roles[Role.MIXED]  # another block size would need another KV cache
    birth = roles[name.role]
    core.scheduler.switch_role(name.role, birth.scheduler)
    core.overlap = birth.overlap
    return core, roles


def switchable(name: InstanceId, config: PdserveConfig) -> bool:
    return config.elastic.enabled and name.role in (Role.PREFILL, Role.DECODE)


class InstanceActor:
    def __init__(self, name: InstanceId, config: dict) -> None:
        self.name = name
        self.config = PdserveConfig.model_validate(config)
        self.loop: InstanceLoop | None = None

    def setup(self) -> dict:
        """Load the model, bind the inbox, start the loop; returns the endpoint."""
        host = self.config.cluster.advertised_host() or node_ip_address()
        roles = None
        if switchable(self.name, self.config):
            core, roles = build_switchable(self.name, self.config, host)
            policy = roles[self.name.role]
        else:
            core, policy = build_role(self.name, self.config, host)
        self.loop = InstanceLoop(self.name, host, core, policy, roles=roles)
        self.loop.start()
        return self._endpoint()

    def endpoint(self) -> dict:
        """setup()'s answer as it is now: the role it serves, and every role's endpoints."""
        return self._on_loop(self._endpoint)

    def _endpoint(self) -> dict:
        loop = self._loop()
        info: dict = {}
        for policy in sorted(loop.policies, key=lambda p: p is loop.policy):  # the current last
            info.update(policy.info())
        return {
            "name": self.name,
            "role": loop.policy.role.value,
            "inbox": loop.inbox.address,
            "max_model_len": loop.core.max_model_len,
            "node_id": _node_id(),
            "ready": loop.policy.ready(),  # a prefill instance: its messager is connected
            **info,
        }

    def switch_role(self, role: str, drain_timeout_s: float, move_on_deadline: bool = True) -> dict:
        """Serve as `role` once the current role's work has drained (cluster/instances/
        switch.py); returns the outcome with the endpoint as it is now. Whoever calls it has
        told the router and the prefill instances to send this one no more old-role work."""
        loop = self._loop()
        give_up_s = drain_timeout_s + self._own_deadlines_s()
        begin = lambda: start_switch(loop, Role(role), drain_timeout_s, give_up_s, move_on_deadline)  # noqa: E731
        future = self._on_loop(begin)
        outcome = future.result(give_up_s + CALL_TIMEOUT_S)
        return {**outcome, "endpoint": self.endpoint()}

    def _own_deadlines_s(self) -> float:
        """The longest that work in flight can take past a drain deadline before its own
        deadline ends it (KV under D's lease, P's transfer)."""
        cfg = self.config
        return cfg.decode.kv_lease_timeout_s + 2 * cfg.prefill.transfer_timeout_s

    def set_decodes(self, decodes: list[dict]) -> None:
        """Prefill (or able to become one): the decode instances to choose from now."""
        self._on_loop(lambda: _prefill_role(self._loop()).set_decodes(decodes))

    def connect(self, messager_inbox: str, decodes: list[dict]) -> None:
        """Prefill: wire to its cache messager and the decode instances (again after a
        restart of either, or on a switch to prefill)."""
        self._on_loop(lambda: _prefill_role(self._loop()).connect(messager_inbox, decodes))

    def decode_down(self, decode_name: InstanceId) -> None:
        """Prefill: a decode instance died; its requests end now (an instance serving another
        role now only forgets its peers: a switch to prefill announces them again)."""
        loop = self._loop()

        def down() -> None:
            if loop.policy.role is Role.PREFILL:
                loop.policy.decode_down(decode_name)
            elif Role.PREFILL in loop.roles:
                loop.roles[Role.PREFILL].set_decodes([])

        self._on_loop(down)

    def is_ready(self) -> bool:
        """False until setup() (and for prefill connect()) ran and the loop thread warmed the
        engine up, also right after a restart."""
        loop = self.loop
        return loop is not None and loop.alive and loop.core.warmed_up and loop.policy.ready()

    def heartbeat_age_s(self) -> float | None:
        """Seconds since the loop last began an iteration (a stalled loop's grows); None before
        setup(), e.g. right after Ray restarted this actor (the supervisor re-wires it)."""
        return self.loop.heartbeat_age_s() if self.loop is not None else None

    def stats(self) -> dict:
        loop = self._loop()
        try:
            return self._on_loop(loop.stats)
        except FutureTimeout:
            age = loop.heartbeat_age_s()
            return {"name": str(self.name), "error": f"loop stalled (heartbeat {age:.0f} s old)"}

    def shutdown(self) -> None:
        if self.loop is not None:
            self.loop.stop()

    def _loop(self) -> InstanceLoop:
        if self.loop is None:
            raise RuntimeError(f"{self.name}: setup() has not run")
        return self.loop

    def _on_loop(self, fn: Callable[[], Any]) -> Any:
        """`fn`'s result, run on the loop; TimeoutError when the loop does not get to it."""
        return self._loop().call(fn, CALL_TIMEOUT_S)


def _node_id() -> str | None:
    """The Ray node this actor runs on (a messager made for it must run there too)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def _prefill_role(loop: InstanceLoop) -> PrefillRole:
    """The loop's prefill policy, whether it serves as prefill now or may switch to it."""
    policy = loop.roles.get(Role.PREFILL, loop.policy)
    if not isinstance(policy, PrefillRole):
        raise ValueError(f"{loop.name} cannot serve as prefill")
    return policy
