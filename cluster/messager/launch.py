"""Starting a cache messager actor: the one place its Ray options are decided (the launcher's
per-prefill messagers and the elastic spare/replacement messagers both come from here)."""

from __future__ import annotations

from typing import Any

import ray

from cluster.config import PdserveConfig
from cluster.messager.actor import CacheMessager
from engine.protocol.identity import MessagerId

MESSAGER_CPUS = 0.25
# Actor methods (stats, is_ready, setup) run on a few Ray threads beside the messager's loop.
_CONCURRENCY = 8
_NOSET_CUDA = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"


def messager_actor(
    config: PdserveConfig, mid: MessagerId, strategy: Any, see_gpus: bool, **options: Any
) -> Any:
    """A cache messager actor named `mid` (not set up yet), placed by `strategy`. `see_gpus`:
    it maps an instance's GPU memory over CUDA IPC and finds that GPU by UUID, so it must see
    the node's GPUs (Ray hides them all from an actor that reserves none). `options` adds Ray
    actor options (max_restarts, get_if_exists)."""
    opts: dict[str, Any] = {
        "name": str(mid),
        "namespace": config.cluster.namespace,
        "num_cpus": MESSAGER_CPUS,
        "max_concurrency": _CONCURRENCY,
        "scheduling_strategy": strategy,
        **options,
    }
    if see_gpus:
        opts["runtime_env"] = {"env_vars": {_NOSET_CUDA: "1"}}
    transfer = config.transfer
    return (
        ray.remote(CacheMessager)
        .options(**opts)
        .remote(
            mid, transfer.backend.value, transfer.cache_task_timeout_s, transfer.staging_buffer_mb
        )
    )
