"""A running deployment: the handles of its actors, and how they are wired together.

Both the launcher (first wiring) and the supervisor (re-wiring after a restart) use the wiring
functions here, so neither imports the other.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import remove_placement_group

from cluster.config import PdserveConfig
from engine.config import Role
from engine.protocol.identity import InstanceId, MessagerId, WorkerId

log = logging.getLogger(__name__)


def deployment_id() -> str:
    """Same for an actor and its restarts, different for another deployment on the node (so
    one never unlinks the other's shared memory): the Ray job that created the actor, within
    its Ray cluster. Every fresh local Ray numbers its first job 01000000, so two clusters on
    one host (two `pdserve serve`, or test runs side by side) differ only by their GCS."""
    if not ray.is_initialized():  # not under Ray (tests that build an instance directly)
        return f"p{os.getpid()}"
    context = ray.get_runtime_context()
    cluster = hashlib.sha256(str(context.gcs_address).encode()).hexdigest()[:8]
    return f"{context.get_job_id()}{cluster}"


@dataclass
class Deployment:
    """Handles of a running deployment; `stop()` tears everything down."""

    config: PdserveConfig
    url: str = ""
    router: Any = None
    # Actor handles by index (a role's instances are `prefill-0`, `prefill-1`, ...); the
    # elastic controller adds and removes instances, so indices may have gaps.
    prefills: dict[int, Any] = field(default_factory=dict)
    messagers: dict[int, Any] = field(default_factory=dict)  # of the prefill-born instances
    decodes: dict[int, Any] = field(default_factory=dict)
    mixed: dict[int, Any] = field(default_factory=dict)
    placement_groups: list[Any] = field(default_factory=list)
    endpoints: list[dict] = field(default_factory=list)
    infos: dict[WorkerId, dict] = field(default_factory=dict)  # each actor's setup() answer
    owns_ray: bool = False
    supervisor: Any = None
    controller: Any = None  # the elastic controller actor, when elastic.enabled
    # Elastic: each decode-born instance's cache messager, idle until a switch to prefill.
    spare_messagers: dict[int, Any] = field(default_factory=dict)
    added: set[InstanceId] = field(default_factory=set)  # by the elastic controller

    def _group(self, role: Role) -> dict[int, Any]:
        return {Role.PREFILL: self.prefills, Role.DECODE: self.decodes, Role.MIXED: self.mixed}[
            role
        ]

    def ids(self, *roles: Role) -> list[InstanceId]:
        return [InstanceId(role, i) for role in roles for i in sorted(self._group(role))]

    def messager_ids(self) -> list[MessagerId]:
        return [MessagerId(i) for i in sorted(self.messagers)]

    @property
    def decode_infos(self) -> list[dict]:
        """The instances serving as decode now (with elastic.enabled not only `decode-N`)."""
        ids = self.ids(Role.DECODE, Role.PREFILL)
        return [
            self.infos[i] for i in ids if i in self.infos and _serves(self.infos[i], Role.DECODE)
        ]

    def may_decode(self, name: InstanceId) -> bool:
        """`name` is, or may have become, a decode instance (elastic instances switch)."""
        switchable = self.config.elastic.enabled and name.role is Role.PREFILL
        return name.role is Role.DECODE or switchable

    def may_prefill(self) -> list[InstanceId]:
        """The instances that are, or may have become, prefill instances."""
        if self.config.elastic.enabled:
            return self.ids(Role.PREFILL, Role.DECODE)
        return self.ids(Role.PREFILL)

    def actor(self, worker: WorkerId) -> Any:
        if isinstance(worker, MessagerId):
            return self.messagers[worker.index]
        return self._group(worker.role)[worker.index]

    def refresh_endpoints(self) -> None:
        """Endpoints from the instances' latest setup() answers."""
        self.endpoints = [self.infos[i] for i in self.ids(Role.PREFILL, Role.DECODE, Role.MIXED)]

    def router_endpoints(self) -> list[dict]:
        """What the router needs of each instance: name, role, inbox."""
        return [{"name": e["name"], "role": e["role"], "inbox": e["inbox"]} for e in self.endpoints]

    @property
    def max_model_len(self) -> int:
        return min(e["max_model_len"] for e in self.endpoints)

    @property
    def instances(self) -> list[Any]:
        return [*self.prefills.values(), *self.decodes.values(), *self.mixed.values()]

    def workers(self) -> list[WorkerId]:
        """Every instance and cache messager (the router aside)."""
        return [*self.ids(Role.PREFILL, Role.DECODE, Role.MIXED), *self.messager_ids()]

    def named_workers(self) -> dict[str, Any]:
        """Every instance and cache messager by name (the router aside)."""
        return {str(w): self.actor(w) for w in self.workers()}

    def sync_added(self, members: list[dict]) -> tuple[list[InstanceId], list[InstanceId]]:
        """Elastic: take in the instances the controller added since (its `members()`,
        cluster/elastic/scaling.py) and forget those it removed. Returns (taken, forgotten)."""
        listed = {m["name"]: m for m in members}
        forgotten = sorted(self.added - set(listed))
        for name in forgotten:
            self._forget(name)
        taken = sorted(set(listed) - self.added)
        for name in taken:
            self._adopt(listed[name])
        if taken or forgotten:
            self.refresh_endpoints()
        return taken, forgotten

    def _adopt(self, member: dict) -> None:
        name: InstanceId = member["name"]
        self._group(name.role)[name.index] = member["actor"]
        self.infos[name] = member["info"]
        if member["messager"] is not None:  # prefill-born: watched with it (MessagerId)
            self.messagers[name.index] = member["messager"]
            self.infos[MessagerId(name.index)] = member["messager_info"]
        if member["spare"] is not None:
            self.spare_messagers[name.index] = member["spare"]
        self.added.add(name)

    def _forget(self, name: InstanceId) -> None:
        self._group(name.role).pop(name.index, None)
        self.infos.pop(name, None)
        if name.role is Role.PREFILL:
            self.messagers.pop(name.index, None)
            self.infos.pop(MessagerId(name.index), None)
        elif name.role is Role.DECODE:
            self.spare_messagers.pop(name.index, None)
        self.added.discard(name)

    def stats(self, timeout_s: float = 30.0) -> dict[str, Any]:
        """Every actor's stats by name; an actor that does not answer in time (stalled, dead)
        appears as {"name", "error"}."""
        actors = {"router": self.router} if self.router is not None else {}
        actors.update(self.named_workers())
        refs = {name: actor.stats.remote() for name, actor in actors.items()}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        done = set(ready)
        out: dict[str, Any] = {}
        for name, ref in refs.items():
            try:
                out[name] = ray.get(ref) if ref in done else {"name": name, "error": "no answer"}
            except Exception as exc:  # a dead actor
                out[name] = {"name": name, "error": f"{type(exc).__name__}: {exc}"}
        return out

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.supervisor is not None:
            self.supervisor.stop()
        spares = self.spare_messagers.values()
        every = [*self.instances, *self.messagers.values(), *spares, self.controller]
        actors = [a for a in every if a is not None]
        refs = [a.shutdown.remote() for a in actors]
        if self.router is not None:
            if self.url:  # a router that never started has no server to stop: only kill it
                refs.append(self.router.stop.remote())
            actors.append(self.router)
        try:
            ray.get(refs, timeout=timeout_s)
        except Exception as exc:  # best effort: the kill below frees everything anyway
            log.warning("shutdown incomplete: %s", exc)
        for actor in actors:
            ray.kill(actor)
        for pg in self.placement_groups:
            remove_placement_group(pg)
        if self.owns_ray:
            ray.shutdown()


def wire_prefill(dep: Deployment, index: int) -> None:
    """(Re)connect prefill instance `index`, its messager and the decode instances."""
    timeout = dep.config.cluster.startup_timeout_s
    p_info = dep.infos[InstanceId(Role.PREFILL, index)]
    messager = dep.messagers[index]
    m_info = ray.get(
        messager.setup.remote(p_info["node_ip"], p_info["kv_cache"], p_info["inbox"]),
        timeout=timeout,
    )
    dep.infos[m_info["name"]] = m_info
    decodes = dep.decode_infos
    ray.get(messager.add_decode_peers.remote(decodes), timeout=timeout)
    ray.get(dep.prefills[index].connect.remote(m_info["inbox"], decodes), timeout=timeout)


def reconnect_decodes(dep: Deployment, skip: Collection[InstanceId] = ()) -> None:
    """After a decode instance restarted: messagers connect to its new transfer endpoint and
    prefill instances learn its new inbox; but the instances in `skip`, which are out of
    service (wire_prefill connects a prefill instance and its messager when back). Elastic: a
    decode-born instance serving as prefill learns them too (its messager is a spare one)."""
    timeout = dep.config.cluster.startup_timeout_s
    decodes = dep.decode_infos
    for index, messager in dep.messagers.items():
        if InstanceId(Role.PREFILL, index) in skip:
            continue
        ray.get(messager.add_decode_peers.remote(decodes), timeout=timeout)
        inbox = dep.infos[MessagerId(index)]["inbox"]
        ray.get(dep.prefills[index].connect.remote(inbox, decodes), timeout=timeout)
    for index, messager in dep.spare_messagers.items():
        name = InstanceId(Role.DECODE, index)
        if name in skip or not _serves(dep.infos.get(name, {}), Role.PREFILL):
            continue
        ray.get(messager.add_decode_peers.remote(decodes, only_new=True), timeout=timeout)
        ray.get(dep.decodes[index].set_decodes.remote(decodes), timeout=timeout)


def refresh_roles(dep: Deployment, skip: Collection[InstanceId], timeout_s: float) -> None:
    """Elastic: each live instance's endpoint as it is now (the role it serves); one that does
    not answer keeps what was known."""
    if not dep.config.elastic.enabled:
        return
    for name in dep.ids(Role.PREFILL, Role.DECODE):
        if name in skip:
            continue
        try:
            dep.infos[name] = ray.get(dep.actor(name).endpoint.remote(), timeout=timeout_s)
        except Exception as exc:  # dead or stalled: the supervisor's next round sees to it
            log.warning("could not read %s's endpoint: %s", name, exc)


def _serves(info: dict, role: Role) -> bool:
    return info.get("role") == role.value
