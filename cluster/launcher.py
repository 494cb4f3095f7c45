"""Builds a running deployment from a validated config: placement groups, actors, wiring.

Plain builder functions (no class hierarchy): decode instances first (their transfer endpoints
are needed by the messagers), then each prefill instance with its cache messager in one
placement-group bundle (same node, same GPU share), then mixed instances, then the router.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import ray
from ray.util.scheduling_strategies import (
    NodeAffinitySchedulingStrategy,
)

from cluster.config import PdserveConfig, RouterPlacement
from cluster.deployment import Deployment, wire_prefill
from cluster.elastic.ray_actuator import start_controller
from cluster.elastic.switching import start_spare_messagers
from cluster.messager.launch import MESSAGER_CPUS
from cluster.router.actor import RouterActor
from cluster.spawn import ACTOR_CONCURRENCY, Spawned, role_section, spawn_instance
from cluster.supervisor import Supervisor
from engine.config import Role
from engine.errors import DeployError
from engine.protocol.identity import InstanceId
from worker.engine_core import resolve_model_path

log = logging.getLogger(__name__)


def init_ray(config: PdserveConfig, address: str | None = None) -> bool:
    """Join `address` (or the config's), or start an embedded local Ray. True if we started it."""
    if ray.is_initialized():
        return False
    address = address or config.cluster.address
    # Unbuffered: an actor's lines reach its log file (and, with log_to_driver, the terminal)
    # when they are written, not when the process exits.
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}}
    to_driver = config.cluster.log_to_driver
    try:
        if address:
            ray.init(
                address=address,
                namespace=config.cluster.namespace,
                runtime_env=env,
                log_to_driver=to_driver,
            )
            return False
        ray.init(
            namespace=config.cluster.namespace,
            num_cpus=max(os.cpu_count() or 1, _cpus_needed(config)),
            include_dashboard=False,
            runtime_env=env,
            log_to_driver=to_driver,
            _node_ip_address=config.cluster.node_ip,
        )
    except Exception as exc:  # Ray raises plain Exception / ConnectionError with a paragraph
        where = f"join the Ray cluster at {address}" if address else "start a local Ray"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DeployError(f"could not {where}: {first}") from exc
    return True


def _cpus_needed(config: PdserveConfig) -> int:
    total = config.router.num_cpus
    total += config.prefill.instances * MESSAGER_CPUS
    if config.elastic.enabled:  # a decode instance gets a messager on a switch to prefill
        total += config.decode.instances * MESSAGER_CPUS
    for section in (config.prefill, config.decode, config.mixed):
        ranks = section.engine.tensor_parallel_size
        total += section.instances * section.placement.num_cpus * ranks
    return int(total) + 1


def deploy(config: PdserveConfig, address: str | None = None) -> Deployment:
    """Start everything the config describes and wait until it serves."""
    resolve_model_path(config.model)  # converts the default model once, here, with progress
    if address:
        config.cluster.address = address
    owns_ray = init_ray(config, address)
    dep = Deployment(config, owns_ray=owns_ray)
    try:
        _start_instances(dep)
        if config.elastic.enabled:
            dep.controller = start_controller(config)
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
    """Every instance of the config (decode first, whose endpoints the messagers need), set up
    in parallel (each loads the model in setup()), then wired."""
    cfg = dep.config
    for role, actors in ((Role.DECODE, dep.decodes), (Role.MIXED, dep.mixed)):
        for i in range(role_section(cfg, role).instances):
            actors[i] = _spawn(dep, InstanceId(role, i)).actor
    for i in range(cfg.prefill.instances):
        spawned = _spawn(dep, InstanceId(Role.PREFILL, i))
        dep.prefills[i], dep.messagers[i] = spawned.actor, spawned.messager
    instances = dep.instances
    infos = ray.get([a.setup.remote() for a in instances], timeout=cfg.cluster.startup_timeout_s)
    dep.infos = {info["name"]: info for info in infos}
    for index in dep.prefills:
        wire_prefill(dep, index)
    if cfg.elastic.enabled:
        decodes = dep.decode_infos
        handles = start_spare_messagers(cfg, decodes)
        dep.spare_messagers = {i["name"].index: h for i, h in zip(decodes, handles, strict=True)}
    dep.refresh_endpoints()


def _spawn(dep: Deployment, iid: InstanceId) -> Spawned:
    spawned = spawn_instance(dep.config, iid)
    if spawned.placement_group is not None:
        dep.placement_groups.append(spawned.placement_group)
    return spawned


def _start_router(dep: Deployment) -> None:
    cfg = dep.config
    raw = cfg.model_dump(mode="json")
    host = cfg.cluster.advertised_host()  # None: the router's own node's
    router = (
        ray.remote(RouterActor)
        .options(
            name="router",
            namespace=cfg.cluster.namespace,
            num_cpus=cfg.router.num_cpus,
            max_concurrency=ACTOR_CONCURRENCY,
            **_router_placement(cfg),
        )
        .remote(raw, str(resolve_model_path(cfg.model)), host, dep.max_model_len)
    )
    dep.router = router  # set first, so that stop() removes it whatever happens next
    endpoints = dep.router_endpoints()
    try:
        dep.url = ray.get(
            # The controller's stats join the instances': /metrics counts its decisions.
            router.start.remote(endpoints, [*dep.instances, *filter(None, [dep.controller])]),
            timeout=cfg.cluster.startup_timeout_s,
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
