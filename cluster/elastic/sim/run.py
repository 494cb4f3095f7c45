"""One simulated run: a deployment, a trace, optional failures, elastic on or off -> results."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from cluster.bench.client import RequestRecord
from cluster.bench.report import Summary, meets_slo, summarize
from cluster.config import PdserveConfig
from cluster.elastic.sim.cluster import SimCluster, SimSettings
from cluster.elastic.sim.control import SimController, Timeline
from cluster.elastic.sim.cost import CostModel
from cluster.elastic.sim.workload import TraceRequest
from engine.config import Role


@dataclass(frozen=True)
class Failure:
    at_s: float
    count: int  # instances crashed at that time, chosen at random (seeded)


@dataclass
class SimResult:
    label: str
    records: list[RequestRecord]
    summary: Summary
    timeline: Timeline
    wall_s: float  # how long the simulation itself took
    events: int
    sim_s: float  # simulated time until the last request ended

    def goodput_bins(self, slo_ms: dict[str, float], bin_s: float) -> list[float]:
        """Requests per second that finished within the SLO, per time bin."""
        bins = [0.0] * (int(self.sim_s // bin_s) + 1)
        for r in self.records:
            if meets_slo(r, slo_ms):
                bins[int(r.end_s // bin_s)] += 1 / bin_s
        return bins


def simulate(
    config: PdserveConfig,
    cost: CostModel,
    trace: list[TraceRequest],
    layout: dict[Role, int],
    settings: SimSettings,
    *,
    elastic: bool,
    label: str = "",
    failures: tuple[Failure, ...] = (),
    seed: int = 0,
) -> SimResult:
    started = time.perf_counter()
    cluster = SimCluster(config, cost, layout, settings)
    controller = SimController(cluster, enabled=elastic, max_instances=config.elastic.max_instances)
    cluster.load(trace)
    rng = random.Random(seed)
    for failure in failures:
        cluster.clock.at(failure.at_s, lambda f=failure: _crash(cluster, f.count, rng))
    cluster.clock.run()
    records = [cluster.record(r) for r in cluster.requests]
    start = min((r.start_s for r in records), default=0.0)
    end = max((r.end_s for r in records if r.success), default=start)
    slo = {"ttft": config.slo.ttft_ms, "tpot": config.slo.tpot_ms}
    return SimResult(
        label=label or _layout_label(layout, elastic),
        records=records,
        summary=summarize(records, end - start, slo),
        timeline=controller.timeline,
        wall_s=time.perf_counter() - started,
        events=cluster.clock.events_run,
        sim_s=cluster.clock.now,
    )


def _crash(cluster: SimCluster, count: int, rng: random.Random) -> None:
    alive = sorted(name for name, inst in cluster.instances.items() if inst.alive)
    for name in rng.sample(alive, min(count, len(alive))):
        cluster.kill(name)


def _layout_label(layout: dict[Role, int], elastic: bool) -> str:
    parts = [f"{n}{role.value[0].upper()}" for role, n in layout.items() if n]
    return ("elastic from " if elastic else "static ") + "".join(parts)
