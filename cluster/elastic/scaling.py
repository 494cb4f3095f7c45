"""Adding and removing instances on a running Ray deployment (the elastic actuator's `add` and
`remove`, `elastic.autoscale`).

Adding one, in `role` (prefill or decode):
1. ask Ray's autoscaler for the resources of every instance the deployment then holds
   (`ray.autoscaler.sdk.request_resources` is a persistent target for the whole cluster, not
   an increment); without an autoscaler this is a no-op and the instance starts only where free
   resources fit it;
2. start its actor as the launcher starts one (cluster/spawn.py), under a fresh name: indices
   go on from the config's count and are never reused;
3. set it up (model loading) within `cluster.startup_timeout_s`, wire it as a role switch wires
   an instance (a prefill instance to its messager and the decode instances; a decode instance
   gets its spare messager, as at start-up), then announce everyone's endpoints
   (cluster/elastic/switching.py): messagers connect to a new decode instance, prefill
   instances learn it, the router starts choosing it and watches its health and stats;
4. list it in `members()`, which the deploying process's supervisor reads every round: from
   then on a crash of it is handled like any other instance's.
An add that fails on the way (no resources within the deadline, setup failed) stops what it
started and takes its resource request back.

Removing one (only an instance added here: those the config starts stay, the floor):
1. refuse if the role it serves now would fall under its elastic minimum;
2. drop it from `members()` (the supervisor lets it go), stop routing to it and take it off
   the prefill instances' decode lists;
3. drain it as a switch drains (its current role's work finishes; at `elastic.drain_timeout_s`
   decoding requests move to another decode instance through the router's migration). A
   drain that does not finish calls the removal off: the instance is announced again and
   serves on, so no request is lost;
4. tell the messagers it is gone (they drop its transfer endpoint), stop watching it, kill
   its actors, remove its placement group and take its resources out of the request.

Adds and removes run on the switcher's one thread, in turn with the switches: each one's
announcements read every instance's endpoint as it is then.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.autoscaler.sdk import request_resources
from ray.util.placement_group import remove_placement_group

from cluster.config import PdserveConfig
from cluster.elastic.switching import (
    RoleSwitcher,
    decodes_of,
    messager_id,
    start_spare_messagers,
)
from cluster.messager.launch import MESSAGER_CPUS
from cluster.spawn import instance_bundles, role_section, spawn_instance
from engine.config import Role
from engine.protocol.identity import InstanceId

log = logging.getLogger(__name__)
_CALL_TIMEOUT_S = 15.0
SCALABLE = (Role.PREFILL, Role.DECODE)


@dataclass
class AddedInstance:
    """An instance the controller started, with what was started for it."""

    name: InstanceId
    actor: Any
    placement_group: Any = None
    messager: Any = None  # prefill-born: its cache messager
    spare: Any = None  # decode-born: the messager set up for a switch to prefill
    info: dict = field(default_factory=dict)  # its endpoint once set up
    messager_info: dict | None = None

    def member(self) -> dict:
        """What the supervisor needs to watch and re-wire it (cluster/deployment.py)."""
        return {
            "name": self.name,
            "actor": self.actor,
            "info": self.info,
            "messager": self.messager,
            "messager_info": self.messager_info,
            "spare": self.spare,
        }

    def actors(self) -> list[Any]:
        return [a for a in (self.actor, self.messager, self.spare) if a is not None]


def resource_bundles(config: PdserveConfig, born: Iterable[Role]) -> list[dict[str, float]]:
    """The bundles of instances born in `born` roles, with what runs beside each (a prefill
    instance's messager; with elastic, a decode instance's spare one)."""
    bundles: list[dict[str, float]] = []
    for role in born:
        section = role_section(config, role)
        beside = MESSAGER_CPUS if role is Role.PREFILL or config.elastic.enabled else 0.0
        bundles += instance_bundles(section.placement, section.engine, beside)
    return bundles


def fits(available: dict[str, float], bundles: list[dict[str, float]]) -> bool:
    """The bundles fit into the free resources summed over the cluster (a node may still lack
    room for them together: the add's deadline covers that)."""
    need: dict[str, float] = {}
    for bundle in bundles:
        for key, amount in bundle.items():
            need[key] = need.get(key, 0.0) + amount
    return all(available.get(key, 0.0) + 1e-9 >= amount for key, amount in need.items())


def minimum_kept(config: PdserveConfig, serving: dict[str, Role], leaving: str) -> str | None:
    """Why removing `leaving` would take its role under the elastic minimum, or None."""
    role = serving[leaving]
    least = {
        Role.PREFILL: config.elastic.min_prefill_instances,
        Role.DECODE: config.elastic.min_decode_instances,
    }.get(role, 0)
    have = sum(1 for r in serving.values() if r is role)
    if have - 1 < least:
        return f"{leaving} is one of {have} {role.value} instances; the minimum is {least}"
    return None


class InstanceScaler:
    """`watch(handles)` tells the router which instances to watch (health, /metrics)."""

    def __init__(
        self, config: PdserveConfig, switcher: RoleSwitcher, watch: Callable[[list], None]
    ) -> None:
        self.config = config
        self.switcher = switcher
        self.watch = watch
        self.added: dict[str, AddedInstance] = {}  # set up and announced, by name
        self._next_index = {r: role_section(config, r).instances for r in SCALABLE}

    # ------------------------------------------------------------------ any thread
    def members(self) -> list[dict]:
        return [a.member() for a in list(self.added.values())]

    def can_add(self) -> bool:
        """Not at `elastic.max_instances`, and room for one more instance of either role now
        (or an autoscaler that adds nodes when asked)."""
        elastic = self.config.elastic
        count = sum(1 for name in self.switcher.named() if _is_instance(name))
        if elastic.max_instances and count >= elastic.max_instances:
            return False
        if elastic.node_autoscaler:
            return True
        available = ray.available_resources()
        return all(fits(available, resource_bundles(self.config, [r])) for r in SCALABLE)

    def add(self, role: Role) -> str:
        if role not in SCALABLE:
            raise ValueError(f"only prefill and decode instances are added, not {role.value}")
        return self.switcher.serially(self._add, role)

    def remove(self, name: str) -> None:
        self.switcher.serially(self._remove, name)

    def release_all(self) -> None:
        """At shutdown: withdraw the resource request. The instances added here are stopped
        with the others (the deployment knows them through the supervisor) and end with this
        actor anyway, which owns them and their placement groups."""
        request_resources(bundles=[])

    # ------------------------------------------------------------------ adding
    def _add(self, role: Role) -> str:
        actors = self.switcher.named()
        instances = self._instances(actors)
        limit = self.config.elastic.max_instances
        if limit and len(instances) >= limit:
            raise RuntimeError(f"elastic.max_instances ({limit}) instances run already")
        name = InstanceId(role, self._next_index[role])
        self._next_index[role] += 1
        born = [i.role for i in instances]
        request_resources(bundles=resource_bundles(self.config, [*born, role]))
        spawned = spawn_instance(self.config, name)
        added = AddedInstance(name, spawned.actor, spawned.placement_group, spawned.messager)
        try:
            self._set_up(added)
        except BaseException:
            log.exception("elastic: adding %s failed; stopping it", name)
            self._discard(added)
            request_resources(bundles=resource_bundles(self.config, born))
            self._announce_as_now()  # in case some heard of it before it failed
            raise
        self.added[str(name)] = added
        self._watch_instances()
        return str(name)

    def _set_up(self, added: AddedInstance) -> None:
        timeout = self.config.cluster.startup_timeout_s
        deadline = time.monotonic() + timeout
        info = ray.get(added.actor.setup.remote(), timeout=timeout)
        actors = self.switcher.named()
        infos = self.switcher.endpoints(actors)
        if added.name.role is Role.PREFILL:
            setup = added.messager.setup.remote(info["node_ip"], info["kv_cache"], info["inbox"])
            added.messager_info = ray.get(setup, timeout=timeout)
            messager = (added.messager, added.messager_info["inbox"])
            self.switcher.connect_prefill(added.actor, messager, decodes_of(infos))
        elif self.config.elastic.enabled:  # as at start-up: a switch to prefill starts nothing
            (added.spare,) = start_spare_messagers(self.config, [info])
        while not ray.get(added.actor.is_ready.remote(), timeout=_CALL_TIMEOUT_S):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{added.name} not ready within {timeout:g} s")
            time.sleep(0.2)
        added.info = ray.get(added.actor.endpoint.remote(), timeout=_CALL_TIMEOUT_S)
        infos[str(added.name)] = added.info
        self.switcher.announce(infos, self.switcher.named())

    # ------------------------------------------------------------------ removing
    def _remove(self, name: str) -> None:
        added = self.added.get(name)
        if added is None:
            raise ValueError(
                f"{name} was not added by the elastic controller (added: {sorted(self.added)}); "
                "the instances the config starts are kept"
            )
        actors = self.switcher.named()
        infos = self.switcher.endpoints(actors)
        serving = {n: Role(i["role"]) for n, i in infos.items() if i.get("ready", True)}
        if name in serving:
            why = minimum_kept(self.config, serving, name)
            if why:
                raise RuntimeError(f"not removing {name}: {why}")
        del self.added[name]  # the supervisor lets it go from its next look
        try:
            if name in infos:
                self.switcher.announce(infos, actors, leaving=name)
                self._drain(added, Role(infos[name]["role"]))
        except BaseException:  # it serves on, announced as it is now
            self.added[name] = added
            self._announce_as_now()
            raise
        self._forget(added, actors)
        self._discard(added)
        born = [i.role for i in self._instances(self.switcher.named())]
        request_resources(bundles=resource_bundles(self.config, born))
        log.warning("elastic: removed %s", name)

    def _drain(self, added: AddedInstance, serving: Role) -> None:
        """Drain its current role's work as a switch does (to the other role, never served)."""
        elastic = self.config.elastic
        target = Role.DECODE if serving is Role.PREFILL else Role.PREFILL
        call = added.actor.switch_role.remote(
            target.value, elastic.drain_timeout_s, self.config.router.migrate_on_failure
        )
        wait = elastic.drain_timeout_s + self.switcher.own_deadlines_s() + 2 * _CALL_TIMEOUT_S
        outcome = ray.get(call, timeout=wait)
        if not outcome["switched"]:
            raise RuntimeError(f"{added.name} did not drain: {outcome['reason']}")

    def _forget(self, added: AddedInstance, actors: dict[str, Any]) -> None:
        """Messagers drop its transfer endpoint; the router no longer watches it."""
        own = str(messager_id(added.name))
        messagers = [a for n, a in actors.items() if n.startswith("messager-") and n != own]
        refs = [m.decode_down.remote(added.name) for m in messagers]
        for ref in refs:
            try:
                ray.get(ref, timeout=_CALL_TIMEOUT_S)
            except Exception as exc:  # a messager restarting reconnects from scratch anyway
                log.warning("elastic: a messager did not hear of %s leaving: %s", added.name, exc)
        self._watch_instances(leaving=str(added.name))

    def _discard(self, added: AddedInstance) -> None:
        made_on_switch = self.switcher.messagers.pop(str(messager_id(added.name)), None)
        for actor in [*added.actors(), made_on_switch]:
            if actor is not None:
                ray.kill(actor, no_restart=True)
        if added.placement_group is not None:
            remove_placement_group(added.placement_group)

    # ------------------------------------------------------------------ helpers
    def _announce_as_now(self) -> None:
        try:
            actors = self.switcher.named()
            self.switcher.announce(self.switcher.endpoints(actors), actors)
        except Exception:  # the error being raised says more; the next change re-announces
            log.exception("elastic: re-announcing every instance failed")

    def _instances(self, actors: dict[str, Any]) -> list[InstanceId]:
        infos = self.switcher.endpoints(actors)
        return [i["name"] for i in infos.values()]

    def _watch_instances(self, leaving: str | None = None) -> None:
        actors = self.switcher.named()
        handles = [a for n, a in actors.items() if _is_instance(n) and n != leaving]
        self.watch(handles)


def _is_instance(name: str) -> bool:
    return name != "router" and not name.startswith("messager-")
