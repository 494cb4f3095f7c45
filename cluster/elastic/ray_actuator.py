"""The elastic controller as a Ray actor, and what acting means on a Ray deployment.

`start_controller(dep)` runs it (named `elastic-controller`) when `elastic.enabled`: the router's
/metrics then counts its decisions (its stats join the instances'), `pdserve status` lists them.
It reads the router's and the instances' stats by name each decision interval, and carries a
switch out through `RoleSwitcher` (cluster/elastic/switching.py): the instances of an elastic
deployment are built for every role. `pdserve switch NAME ROLE` forces one
(`ElasticControllerActor.force_switch`). Adding and removing instances (`elastic.autoscale`, or
`force_add` / `force_remove`) is `InstanceScaler`'s (cluster/elastic/scaling.py); the instances
it added are listed by `members()`, which the deploying process's supervisor reads.
"""

from __future__ import annotations

import logging
from typing import Any

import ray

from cluster.config import PdserveConfig
from cluster.elastic.controller import ElasticController
from cluster.elastic.policy import DecisionKind
from cluster.elastic.scaling import InstanceScaler
from cluster.elastic.switching import RoleSwitcher
from cluster.tp_ranks import is_rank_actor
from engine.config import Role
from engine.errors import DeployError

log = logging.getLogger(__name__)
CONTROLLER_NAME = "elastic-controller"
_STATS_TIMEOUT_S = 5.0
_ROLES = {r.value for r in Role}


class RayActuator:
    def __init__(self, config: PdserveConfig) -> None:
        self.config = config
        self.namespace = config.cluster.namespace
        self.switcher = RoleSwitcher(config, self._named)
        self.scaler = InstanceScaler(config, self.switcher, self._watch)

    def _named(self) -> dict[str, Any]:
        names = [
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a.get("namespace") == self.namespace
            and a["name"] != CONTROLLER_NAME
            and not is_rank_actor(a["name"])  # its instance speaks for it
        ]
        return {name: ray.get_actor(name, namespace=self.namespace) for name in names}

    def collect(self) -> tuple[dict | None, list[dict]]:
        actors = self._named()
        refs = {name: actor.stats.remote() for name, actor in actors.items()}
        router, instances = None, []
        for name, ref in refs.items():
            try:
                stats = ray.get(ref, timeout=_STATS_TIMEOUT_S)
            except Exception as exc:  # dead or stalled: the policy leaves it out
                stats = {"name": name, "error": f"{type(exc).__name__}: {exc}"}
            if name == "router":
                router = stats
            elif stats.get("role") in _ROLES or "error" in stats:
                instances.append(stats)
        return router, instances

    def can_switch(self) -> bool:
        """An elastic deployment's prefill and decode instances are built for every role."""
        return self.config.elastic.enabled

    def switch(self, name: str, role: Role) -> None:
        outcome = self.switcher.switch(name, role)
        log.warning("elastic: %s serves as %s (%s)", name, role.value, outcome)

    def add(self, role: Role) -> str:
        return self.scaler.add(role)

    def remove(self, name: str) -> None:
        self.scaler.remove(name)

    def can_add(self) -> bool:
        return self.scaler.can_add()

    def removable(self) -> set[str]:
        """Only the instances added here are removed (those the config starts stay)."""
        return set(self.scaler.added)

    def _watch(self, instances: list[Any]) -> None:
        """The router's health check and /metrics cover these instances and this controller."""
        me = ray.get_runtime_context().current_actor
        router = ray.get_actor("router", namespace=self.namespace)
        ray.get(router.watch.remote([*instances, me]), timeout=_STATS_TIMEOUT_S)


class ElasticControllerActor:
    """Ray actor wrapper: the constructor does no I/O; `start()` begins the loop."""

    def __init__(self, config: dict) -> None:
        self.config = PdserveConfig.model_validate(config)
        self.actuator = RayActuator(self.config)
        self.controller = ElasticController(self.config, self.actuator)

    def start(self) -> None:
        self.controller.start()

    def is_ready(self) -> bool:
        return True

    def stats(self) -> dict:
        return self.controller.stats()

    def force_switch(self, name: str, role: str, wait_s: float = 0.0) -> dict:
        """Switch `name` to `role` now (`pdserve switch`); its decision record, once carried
        out or after `wait_s`."""
        return self.controller.force_switch(name, role, wait_s)

    def force_add(self, role: str, wait_s: float = 0.0) -> dict:
        """Add an instance in `role` now; its decision record (the new name in `instance`)."""
        return self.controller.force(DecisionKind.ADD, Role(role), None, wait_s)

    def force_remove(self, name: str, wait_s: float = 0.0) -> dict:
        """Drain and remove the added instance `name` now; its decision record."""
        added = self.actuator.scaler.added.get(name)
        if added is None:
            added_names = sorted(self.actuator.scaler.added) or "none"
            raise DeployError(
                f"{name} was not added by the elastic controller (added: {added_names}); the "
                "instances the config starts are kept"
            )
        return self.controller.force(DecisionKind.REMOVE, added.name.role, name, wait_s)

    def members(self) -> list[dict]:
        """The instances this controller added and set up (the supervisor watches them)."""
        return self.actuator.scaler.members()

    def shutdown(self) -> None:
        self.controller.stop()
        self.actuator.scaler.release_all()


def start_controller(config: PdserveConfig) -> Any:
    """Create and start the controller actor (no resources of its own: it only watches)."""
    actor = (
        ray.remote(ElasticControllerActor)
        .options(
            name=CONTROLLER_NAME,
            namespace=config.cluster.namespace,
            num_cpus=0,
            # Forced changes wait on method threads; stats (/metrics, status) and the
            # supervisor's members() must still be answered meanwhile.
            max_concurrency=8,
        )
        .remote(config.model_dump(mode="json"))
    )
    ray.get(actor.start.remote(), timeout=config.cluster.startup_timeout_s)
    return actor
