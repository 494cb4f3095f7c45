"""Builds a running deployment from a validated config: placement groups, actors, wiring.

Plain builder functions (no class hierarchy): decode instances first (their transfer endpoints
are needed by the messagers), then each prefill instance with its cache messager in one
placement-group bundle (same node, same GPU share), then mixed instances, then the router.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import (
    NodeAffinitySchedulingStrategy,
    PlacementGroupSchedulingStrategy,
)

from cache_transfer.messager import CacheMessager
from cluster.config import PdserveConfig, PlacementConfig, RouterPlacement
from cluster.instances.decode import DecodeInstance
from cluster.instances.mixed import MixedInstance
from cluster.instances.prefill import PrefillInstance
from cluster.router.actor import RouterActor
from cluster.supervisor import Supervisor
from engine.config import Role
from engine.errors import DeployError
from engine.protocol.identity import InstanceId, MessagerId, WorkerId
from worker.engine_core import resolve_model_path

log = logging.getLogger(__name__)

_MESSAGER_CPUS = 0.25
_RAY_NOSET_CUDA_VISIBLE_DEVICES = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"
# Actor methods (stats, is_ready, abort plumbing) run on a few Ray threads beside the actor's own.
_ACTOR_CONCURRENCY = 8


@dataclass
class Deployment:
    """Handles of a running deployment; `stop()` tears everything down."""

    config: PdserveConfig
    url: str = ""
    router: Any = None
    prefills: list[Any] = field(default_factory=list)
    messagers: list[Any] = field(default_factory=list)
    decodes: list[Any] = field(default_factory=list)
    mixed: list[Any] = field(default_factory=list)
    placement_groups: list[Any] = field(default_factory=list)
    endpoints: list[dict] = field(default_factory=list)
    infos: dict[WorkerId, dict] = field(default_factory=dict)  # each actor's setup() answer
    owns_ray: bool = False
    supervisor: Any = None

    def _group(self, role: Role) -> list[Any]:
        return {Role.PREFILL: self.prefills, Role.DECODE: self.decodes, Role.MIXED: self.mixed}[
            role
        ]

    def ids(self, *roles: Role) -> list[InstanceId]:
        return [InstanceId(role, i) for role in roles for i in range(len(self._group(role)))]

    def messager_ids(self) -> list[MessagerId]:
        return [MessagerId(i) for i in range(len(self.messagers))]

    @property
    def decode_infos(self) -> list[dict]:
        return [self.infos[i] for i in self.ids(Role.DECODE)]

    def actor(self, worker: WorkerId) -> Any:
        if isinstance(worker, MessagerId):
            return self.messagers[worker.index]
        return self._group(worker.role)[worker.index]

    @property
    def max_model_len(self) -> int:
        return min(e["max_model_len"] for e in self.endpoints)

    @property
    def instances(self) -> list[Any]:
        return [*self.prefills, *self.decodes, *self.mixed]

    def workers(self) -> list[WorkerId]:
        """Every instance and cache messager (the router aside)."""
        return [*self.ids(Role.PREFILL, Role.DECODE, Role.MIXED), *self.messager_ids()]

    def named_workers(self) -> dict[str, Any]:
        """Every instance and cache messager by name (the router aside)."""
        return {str(w): self.actor(w) for w in self.workers()}

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
        actors = [a for a in [*self.instances, *self.messagers] if a is not None]
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


def init_ray(config: PdserveConfig, address: str | None = None) -> bool:
    """Join `address` (or the config's), or start an embedded local Ray. True if we started it."""
    if ray.is_initialized():
        return False
    address = address or config.cluster.address
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    if address:
        ray.init(address=address, namespace=config.cluster.namespace, runtime_env=env)
        return False
    ray.init(
        namespace=config.cluster.namespace,
        num_cpus=max(os.cpu_count() or 1, _cpus_needed(config)),
        include_dashboard=False,
        runtime_env=env,
        _node_ip_address=config.cluster.node_ip,
    )
    return True


def _cpus_needed(config: PdserveConfig) -> int:
    total = config.router.num_cpus
    total += config.prefill.instances * (config.prefill.placement.num_cpus + _MESSAGER_CPUS)
    total += config.decode.instances * config.decode.placement.num_cpus
    total += config.mixed.instances * config.mixed.placement.num_cpus
    return int(total) + 1


def _max_restarts(cfg: PdserveConfig) -> int:
    return -1 if cfg.cluster.restart_crashed_actors else 0


def _options(placement: PlacementConfig, name: str, cfg: PdserveConfig) -> dict[str, Any]:
    options: dict[str, Any] = {
        "name": name,
        "namespace": cfg.cluster.namespace,
        "num_cpus": placement.num_cpus,
        "num_gpus": placement.num_gpus,
        "max_concurrency": _ACTOR_CONCURRENCY,
        "max_restarts": _max_restarts(cfg),
    }
    if placement.resources:
        options["resources"] = dict(placement.resources)
    if placement.label_selector:
        options["label_selector"] = dict(placement.label_selector)
    return options


def deploy(config: PdserveConfig, address: str | None = None) -> Deployment:
    """Start everything the config describes and wait until it serves."""
    resolve_model_path(config.model)  # converts the default model once, here, with progress
    if address:
        config.cluster.address = address
    owns_ray = init_ray(config, address)
    dep = Deployment(config, owns_ray=owns_ray)
    try:
        _start_instances(dep)
        _start_router(dep)
        wait_ready(dep, config.cluster.startup_timeout_s)
        if config.cluster.restart_crashed_actors:
            dep.supervisor = Supervisor(dep)
            dep.supervisor.start()
    except BaseException:
        dep.stop()
        raise
    return dep


def _start_instances(dep: Deployment) -> None:
    cfg = dep.config
    raw = cfg.model_dump(mode="json")
    for i in range(cfg.decode.instances):
        iid = InstanceId(Role.DECODE, i)
        opts = _options(cfg.decode.placement, str(iid), cfg)
        dep.decodes.append(ray.remote(DecodeInstance).options(**opts).remote(iid, raw))
    for i in range(cfg.mixed.instances):
        iid = InstanceId(Role.MIXED, i)
        opts = _options(cfg.mixed.placement, str(iid), cfg)
        dep.mixed.append(ray.remote(MixedInstance).options(**opts).remote(iid, raw))
    prefill_pgs = [_prefill_placement_group(cfg) for _ in range(cfg.prefill.instances)]
    dep.placement_groups.extend(prefill_pgs)
    for i, pg in enumerate(prefill_pgs):
        iid = InstanceId(Role.PREFILL, i)
        opts = _options(cfg.prefill.placement, str(iid), cfg)
        opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, 0)
        opts.pop("label_selector", None)  # the bundle carries placement
        dep.prefills.append(ray.remote(PrefillInstance).options(**opts).remote(iid, raw))
        dep.messagers.append(_messager_actor(cfg, i, pg))
    # Model loading happens in setup(); every instance loads in parallel.
    instances = [*dep.decodes, *dep.prefills, *dep.mixed]
    infos = ray.get([a.setup.remote() for a in instances], timeout=cfg.cluster.startup_timeout_s)
    dep.infos = {info["name"]: info for info in infos}
    for index in range(len(dep.prefills)):
        wire_prefill(dep, index)
    dep.endpoints = [dep.infos[i] for i in dep.ids(Role.PREFILL, Role.DECODE, Role.MIXED)]


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


def reconnect_decodes(dep: Deployment) -> None:
    """After a decode instance restarted: messagers connect to its new transfer endpoint and
    prefill instances learn its new inbox."""
    timeout = dep.config.cluster.startup_timeout_s
    decodes = dep.decode_infos
    for index, messager in enumerate(dep.messagers):
        ray.get(messager.add_decode_peers.remote(decodes), timeout=timeout)
        inbox = dep.infos[MessagerId(index)]["inbox"]
        ray.get(dep.prefills[index].connect.remote(inbox, decodes), timeout=timeout)


def _prefill_placement_group(cfg: PdserveConfig):
    placement = cfg.prefill.placement
    bundle: dict[str, float] = {"CPU": placement.num_cpus + _MESSAGER_CPUS}
    if placement.num_gpus:
        bundle["GPU"] = placement.num_gpus
    bundle.update(placement.resources)
    kwargs = {}
    if placement.label_selector:
        kwargs["bundle_label_selector"] = [dict(placement.label_selector)]
    return placement_group([bundle], strategy="STRICT_PACK", **kwargs)


def _messager_actor(cfg: PdserveConfig, index: int, pg):
    name = MessagerId(index)
    options: dict[str, Any] = {
        "name": str(name),
        "namespace": cfg.cluster.namespace,
        "num_cpus": _MESSAGER_CPUS,
        "max_concurrency": _ACTOR_CONCURRENCY,
        "max_restarts": _max_restarts(cfg),
        "scheduling_strategy": PlacementGroupSchedulingStrategy(pg, 0),
    }
    if cfg.prefill.placement.num_gpus:
        # It maps P's GPU memory over CUDA IPC and finds that GPU by UUID, so it must see the
        # node's GPUs; Ray would hide them all from an actor that reserves none.
        options["runtime_env"] = {"env_vars": {_RAY_NOSET_CUDA_VISIBLE_DEVICES: "1"}}
    return (
        ray.remote(CacheMessager)
        .options(**options)
        .remote(name, cfg.transfer.backend.value, cfg.transfer.cache_task_timeout_s)
    )


def _start_router(dep: Deployment) -> None:
    cfg = dep.config
    raw = cfg.model_dump(mode="json")
    router = (
        ray.remote(RouterActor)
        .options(
            name="router",
            namespace=cfg.cluster.namespace,
            num_cpus=cfg.router.num_cpus,
            max_concurrency=_ACTOR_CONCURRENCY,
            **_router_placement(cfg),
        )
        .remote(raw, str(resolve_model_path(cfg.model)), _router_host(cfg), dep.max_model_len)
    )
    dep.router = router  # set first, so that stop() removes it whatever happens next
    endpoints = [{"name": e["name"], "role": e["role"], "inbox": e["inbox"]} for e in dep.endpoints]
    try:
        dep.url = ray.get(
            router.start.remote(endpoints, dep.instances), timeout=cfg.cluster.startup_timeout_s
        )
    except (ray.exceptions.GetTimeoutError, ray.exceptions.ActorUnschedulableError) as exc:
        where = (
            "this node (router.placement: driver_node)"
            if cfg.router.placement is RouterPlacement.DRIVER_NODE
            else "a node"
        )
        raise DeployError(
            f"the router could not start within cluster.startup_timeout_s "
            f"({cfg.cluster.startup_timeout_s:g} s): it needs router.num_cpus "
            f"({cfg.router.num_cpus:g}) free CPUs on {where} ({type(exc).__name__})"
        ) from exc


def _router_placement(cfg: PdserveConfig) -> dict[str, Any]:
    """Scheduling options of the router actor (`router.placement`)."""
    if cfg.router.placement is RouterPlacement.ANY:
        return {}
    # Hard affinity: without room there, start-up fails with an error that says so, instead
    # of the router's port opening on some other node.
    node_id = ray.get_runtime_context().get_node_id()
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False)}


def _router_host(cfg: PdserveConfig) -> str | None:
    """Embedded Ray: the configured loopback address; a cluster: the router's own node's."""
    return cfg.cluster.node_ip if cfg.cluster.address is None else None


def wait_ready(dep: Deployment, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    workers = dep.named_workers()
    while True:
        ready = ray.get([a.is_ready.remote() for a in workers.values()], timeout=timeout_s)
        if all(ready):
            return
        if time.monotonic() > deadline:
            names = [n for n, ok in zip(workers, ready, strict=True) if not ok]
            raise DeployError(f"instances not ready after {timeout_s:.0f} s: {names}")
        time.sleep(0.2)
