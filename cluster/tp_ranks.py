"""Ranks 1..N-1 of a tensor-parallel instance as Ray actors (worker/tp_worker.py's loop).

The launcher gives a tensor-parallel instance one STRICT_PACK placement group of N bundles (a
GPU or a share of one each, so the ranks sit on one node and NCCL and the driver's loopback
sockets reach them): the instance actor (rank 0, the driver) takes bundle 0, rank r takes
bundle r. Ray sets each actor's CUDA_VISIBLE_DEVICES to its own GPU, so every rank names its
device cuda:0. A rank actor is owned by the instance actor that created it, so it dies with it;
it never restarts on its own (a restarted instance makes new ranks).
"""

from __future__ import annotations

from typing import Any

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from worker.tp_worker import RankSpec, run_rank


class RankActor:
    """One rank's process. `run` holds the actor for the rank's whole life."""

    def run(self, spec: RankSpec) -> None:
        run_rank(spec)


class RayRank:
    """A started rank actor, as the driver's watchdog sees it."""

    def __init__(self, spec: RankSpec, options: dict[str, Any]) -> None:
        self.rank = spec.rank
        self.actor = ray.remote(RankActor).options(**options).remote()
        self._done = self.actor.run.remote(spec)

    def alive(self) -> bool:
        ready, _ = ray.wait([self._done], timeout=0)
        return not ready

    def describe(self) -> str:
        try:
            ray.get(self._done, timeout=0)
        except Exception as e:  # RayActorError, RayTaskError: the rank's own error inside
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            return f"rank {self.rank} actor ended: {first}"
        return f"rank {self.rank} actor returned"

    def stop(self, timeout_s: float) -> None:
        ray.wait([self._done], timeout=timeout_s)
        ray.kill(self.actor, no_restart=True)


class RayRanks:
    """A RankLauncher (worker/tp_runner.py) for the calling actor's placement group: rank r in
    bundle r with the instance's per-rank `num_gpus` and `num_cpus`. Build it inside the
    instance actor. A failed group ends the instance's process: Ray restarts it, with new ranks.
    """

    exit_on_failure = True

    def __init__(self, num_gpus: float, num_cpus: float, name_prefix: str) -> None:
        from ray.util import get_current_placement_group

        self.pg = get_current_placement_group()
        if self.pg is None:
            raise RuntimeError(
                f"{name_prefix}: a tensor-parallel instance needs its placement group"
            )
        self.num_gpus, self.num_cpus, self.name_prefix = num_gpus, num_cpus, name_prefix

    def __call__(self, specs: list[RankSpec]) -> list[RayRank]:
        return [RayRank(spec, self._options(spec.rank)) for spec in specs]

    def devices(self, device, size: int) -> list[str]:
        """Ray shows each actor only its own GPU, as cuda:0."""
        return ["cuda:0" if device.type == "cuda" else "cpu"] * size

    def _options(self, rank: int) -> dict[str, Any]:
        return {
            "name": rank_actor_name(self.name_prefix, rank),
            "num_cpus": self.num_cpus,
            "num_gpus": self.num_gpus,
            "max_restarts": 0,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(self.pg, rank),
        }


def rank_actor_name(instance: str, rank: int) -> str:
    return f"{instance}{_RANK_INFIX}{rank}"


def is_rank_actor(name: str) -> bool:
    """A tensor-parallel rank's actor (it has no stats: its instance speaks for it)."""
    return _RANK_INFIX in name


_RANK_INFIX = "-rank-"


def ray_ranks_for(placement, engine, name: str) -> RayRanks | None:
    """The rank launcher of an instance with this placement and engine config: None (the
    engine's default, local processes) at TP 1 or outside Ray, e.g. loops driven by tests."""
    if engine.tensor_parallel_size == 1 or not ray.is_initialized():
        return None
    return RayRanks(placement.num_gpus, placement.num_cpus, name)
