"""The Ray actor of every instance: one class; its name's role picks the policy its loop holds.

Ray runs the methods below on its own threads (`max_concurrency`); none touches the loop's
state. `connect`, `decode_down` and `stats` run on the loop (`InstanceLoop.call`, with a
deadline); `is_ready` and `heartbeat_age_s` read what the loop publishes.
"""

from __future__ import annotations

from concurrent.futures import TimeoutError as FutureTimeout

from cluster.config import PdserveConfig
from cluster.instances.common import advertised_host
from cluster.instances.loop import InstanceLoop, RolePolicy
from cluster.instances.prefill_role import PrefillRole
from cluster.instances.roles import DecodeRole, MixedRole
from engine.config import Role
from engine.protocol.identity import InstanceId
from worker.engine_core import EngineCore

CALL_TIMEOUT_S = 10.0  # a loop busy longer than this with one step is stalled


def build_role(name: InstanceId, config: PdserveConfig, host: str) -> tuple[EngineCore, RolePolicy]:
    """The engine and the policy of `name.role` (the engine first where the policy needs it)."""
    if name.role is Role.PREFILL:
        prefill = PrefillRole(name, config, host)
        return prefill.build_core(config), prefill
    if name.role is Role.DECODE:
        core = DecodeRole.build_core(config, name)
        return core, DecodeRole(name, config, core, host)
    return MixedRole.build_core(config, name), MixedRole()


class InstanceActor:
    def __init__(self, name: InstanceId, config: dict) -> None:
        self.name = name
        self.config = PdserveConfig.model_validate(config)
        self.loop: InstanceLoop | None = None

    def setup(self) -> dict:
        """Load the model, bind the inbox, start the loop; returns the endpoint."""
        host = advertised_host(self.config)
        core, policy = build_role(self.name, self.config, host)
        self.loop = InstanceLoop(self.name, host, core, policy)
        self.loop.start()
        return {
            "name": self.name,
            "role": self.name.role.value,
            "inbox": self.loop.inbox.address,
            "max_model_len": core.max_model_len,
            **policy.info(),
        }

    def connect(self, messager_inbox: str, decodes: list[dict]) -> None:
        """Prefill: wire to its cache messager and the decode instances (again after a
        restart of either)."""
        loop = self._loop()
        loop.call(lambda: loop.policy.connect(messager_inbox, decodes), CALL_TIMEOUT_S)

    def decode_down(self, decode_name: InstanceId) -> None:
        """Prefill: a decode instance died; its requests end now."""
        loop = self._loop()
        loop.call(lambda: loop.policy.decode_down(decode_name), CALL_TIMEOUT_S)

    def is_ready(self) -> bool:
        """False until setup() (and for prefill connect()) ran, also right after a restart."""
        return self.loop is not None and self.loop.alive and self.loop.policy.ready()

    def heartbeat_age_s(self) -> float | None:
        """Seconds since the loop last began an iteration (a stalled loop's grows); None before
        setup(), e.g. right after Ray restarted this actor (the supervisor re-wires it)."""
        return self.loop.heartbeat_age_s() if self.loop is not None else None

    def stats(self) -> dict:
        loop = self._loop()
        try:
            return loop.call(loop.stats, CALL_TIMEOUT_S)
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
