"""Starting one instance actor as the config places its role: the launcher starts every instance
of a deployment with it, the elastic controller one more (cluster/elastic/scaling.py).

A decode or mixed instance is an actor of its own (in a placement group of one bundle per rank
when it runs tensor-parallel); a prefill instance shares its placement group's first bundle
with its cache messager (same node, same GPU share: the messager maps its KV cache).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.config import PdserveConfig, PlacementConfig
from cluster.instances.actor import InstanceActor
from cluster.messager.launch import MESSAGER_CPUS, messager_actor
from engine.config import EngineConfig, Role
from engine.protocol.identity import InstanceId, MessagerId

# Actor methods (stats, is_ready, abort plumbing) run on a few Ray threads beside the actor's own.
ACTOR_CONCURRENCY = 8


@dataclass
class Spawned:
    """An instance actor just started (not set up yet), with what was started for it."""

    actor: Any
    messager: Any = None  # a prefill instance's cache messager
    placement_group: Any = None


def spawn_instance(cfg: PdserveConfig, iid: InstanceId) -> Spawned:
    """Start instance `iid`'s actor (and a prefill instance's messager) without waiting: its
    `setup()` waits for the resources and loads the model."""
    section = role_section(cfg, iid.role)
    raw = cfg.model_dump(mode="json")
    opts = actor_options(section.placement, str(iid), cfg)
    beside = MESSAGER_CPUS if iid.role is Role.PREFILL else 0.0
    pg = None
    if iid.role is Role.PREFILL or section.engine.tensor_parallel_size > 1:
        pg = instance_placement_group(section.placement, section.engine, beside)
        opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, 0)
        opts.pop("label_selector", None)  # the bundles carry placement
    actor = ray.remote(InstanceActor).options(**opts).remote(iid, raw)
    messager = _messager_actor(cfg, iid.index, pg) if iid.role is Role.PREFILL else None
    return Spawned(actor, messager, pg)


def role_section(cfg: PdserveConfig, role: Role) -> Any:
    """The config section of instances born in `role` (their placement and engine)."""
    return {Role.PREFILL: cfg.prefill, Role.DECODE: cfg.decode, Role.MIXED: cfg.mixed}[role]


def instance_bundles(
    placement: PlacementConfig, engine: EngineConfig, beside_rank0_cpus: float = 0.0
) -> list[dict[str, float]]:
    """The resources of one instance: a bundle per rank, rank 0's with room for what runs
    beside it."""
    bundle: dict[str, float] = {"CPU": placement.num_cpus}
    if placement.num_gpus:
        bundle["GPU"] = placement.num_gpus
    bundle.update(placement.resources)
    bundles = [dict(bundle) for _ in range(engine.tensor_parallel_size)]
    bundles[0]["CPU"] += beside_rank0_cpus
    return bundles


def instance_placement_group(
    placement: PlacementConfig, engine: EngineConfig, beside_rank0_cpus: float = 0.0
):
    """One bundle per rank on one node (NCCL and the driver's loopback sockets reach every
    rank): the instance actor (rank 0) takes bundle 0, rank r bundle r (cluster/tp_ranks.py).
    Bundle 0 also holds `beside_rank0_cpus` for what runs beside the instance (a prefill
    instance's cache messager, which maps its caches through shared memory or CUDA IPC)."""
    bundles = instance_bundles(placement, engine, beside_rank0_cpus)
    kwargs = {}
    if placement.label_selector:
        kwargs["bundle_label_selector"] = [dict(placement.label_selector)] * len(bundles)
    return placement_group(bundles, strategy="STRICT_PACK", **kwargs)


def max_restarts(cfg: PdserveConfig) -> int:
    return -1 if cfg.cluster.restart_crashed_actors else 0


def actor_options(placement: PlacementConfig, name: str, cfg: PdserveConfig) -> dict[str, Any]:
    options: dict[str, Any] = {
        "name": name,
        "namespace": cfg.cluster.namespace,
        "num_cpus": placement.num_cpus,
        "num_gpus": placement.num_gpus,
        "max_concurrency": ACTOR_CONCURRENCY,
        "max_restarts": max_restarts(cfg),
    }
    if placement.resources:
        options["resources"] = dict(placement.resources)
    if placement.label_selector:
        options["label_selector"] = dict(placement.label_selector)
    return options


def _messager_actor(cfg: PdserveConfig, index: int, pg):
    strategy = PlacementGroupSchedulingStrategy(pg, 0)  # in its prefill instance's bundle
    see_gpus = bool(cfg.prefill.placement.num_gpus)
    return messager_actor(
        cfg, MessagerId(index), strategy, see_gpus, max_restarts=max_restarts(cfg)
    )
