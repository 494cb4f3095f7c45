"""The simulated cluster: requests flow through the real schedulers, nothing is lost or leaked,
switches and crashes behave. Small traces: these run in a few seconds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from cluster.config import load_config
from cluster.elastic.sim.cluster import SimCluster, SimSettings
from cluster.elastic.sim.control import SimController
from cluster.elastic.sim.cost import fit_cost_model
from cluster.elastic.sim.run import simulate
from cluster.elastic.sim.workload import Phase, bench_trace, phased_trace
from engine.config import Role

ROOT = Path(__file__).resolve().parents[3]


@dataclass(frozen=True)
class Crash:
    at_s: float
    names: tuple[str, ...]


P, D = Role.PREFILL, Role.DECODE


@pytest.fixture(scope="module")
def config():
    return load_config(ROOT / "configs" / "gpu-llama3-8b-elastic.yaml")


@pytest.fixture(scope="module")
def cost():
    results = ROOT / "benchmarks" / "results"
    return fit_cost_model(results / "gpu_h100_decode.json", results / "gpu_h100_pd.json")


def run(config, cost, trace, layout, quantum=1, elastic=False, failures=()):
    """simulate(), keeping the cluster to inspect it afterwards."""
    cluster = SimCluster(config, cost, layout, SimSettings(quantum=quantum, startup_s=2.0))
    controller = SimController(cluster, enabled=elastic)
    cluster.load(trace)
    for f in failures:
        cluster.clock.at(f.at_s, lambda f=f: [cluster.kill(n) for n in f.names])
    cluster.clock.run()
    return cluster, controller


def assert_nothing_leaked(cluster: SimCluster) -> None:
    assert all(r.finished for r in cluster.requests)
    for inst in cluster.instances.values():
        if inst.alive:
            inst.scheduler.check_invariants()
            assert not inst.scheduler.requests and not inst.tracked, inst.name
            assert inst.block_manager.num_free_blocks == inst.block_manager.num_blocks


def test_one_request_costs_what_the_model_says(config, cost) -> None:
    trace = bench_trace(1, 1.0, 2048, 8, 0.0, seed=0)
    cluster, _ = run(config, cost, trace, {P: 1, D: 1})
    (record,) = [cluster.record(r) for r in cluster.requests]
    assert record.success and record.output_tokens == 8
    assert record.ttft_s == pytest.approx(cost.prepare_s + cost.prefill_s(2048))
    # Each decode step reads the weights and the request's KV; the first also waits for the KV.
    assert record.tpot_s == pytest.approx(cost.step_s([], [2050]), rel=0.05)
    assert_nothing_leaked(cluster)


def test_a_bench_trace_is_served_and_everything_is_freed(config, cost) -> None:
    trace = bench_trace(60, 8.0, 1024, 128, 0.5, seed=1)
    cluster, _ = run(config, cost, trace, {P: 1, D: 1})
    records = [cluster.record(r) for r in cluster.requests]
    assert all(r.success for r in records)
    assert [r.output_tokens for r in records] == [t.output_tokens for t in trace]
    assert_nothing_leaked(cluster)


def test_the_quantum_changes_little(config, cost) -> None:
    trace = bench_trace(80, 6.0, 1024, 256, 0.5, seed=2)
    exact = simulate(config, cost, trace, {P: 1, D: 1}, SimSettings(quantum=1), elastic=False)
    coarse = simulate(config, cost, trace, {P: 1, D: 1}, SimSettings(quantum=16), elastic=False)
    for metric in ("ttft", "tpot"):
        a = exact.summary.latency_ms[metric]["median"]
        b = coarse.summary.latency_ms[metric]["median"]
        assert b == pytest.approx(a, rel=0.1), metric


def test_elastic_switches_both_ways_without_losing_a_request(config, cost) -> None:
    trace = phased_trace(
        [Phase("A", 20.0, 22.0, 4096, 32), Phase("B", 20.0, 100.0, 128, 256)], seed=3
    )
    cluster, controller = run(config, cost, trace, {P: 2, D: 2}, quantum=16, elastic=True)
    kinds = {(d.from_role, d.to_role) for d in controller.timeline.decisions}
    assert (D, P) in kinds and (P, D) in kinds
    assert len(controller.timeline.switch_seconds) == len(controller.timeline.decisions)
    records = [cluster.record(r) for r in cluster.requests]
    assert all(r.success or r.error for r in records)
    assert_nothing_leaked(cluster)


def test_a_crash_fails_or_retries_what_the_instance_held(config, cost) -> None:
    trace = bench_trace(120, 20.0, 1024, 128, 0.5, seed=4)
    crash = Crash(2.0, ("i2",))  # the first decode instance
    cluster, _ = run(config, cost, trace, {P: 2, D: 2}, failures=(crash,))
    records = [cluster.record(r) for r in cluster.requests]
    failed = [r for r in records if not r.success]
    assert failed and all("instance i2 failed" in r.error for r in failed)
    assert sum(r.success for r in records) > len(records) // 2
    assert cluster.instances["i2"].alive  # restarted after startup_s
    assert_nothing_leaked(cluster)


def test_a_crashed_prefill_instance_is_retried_elsewhere(config, cost) -> None:
    trace = bench_trace(40, 40.0, 4096, 16, 0.0, seed=5)
    crash = Crash(0.3, ("i0",))
    cluster, _ = run(config, cost, trace, {P: 2, D: 2}, failures=(crash,))
    retried = [r for r in cluster.requests if r.attempt > 0]
    assert retried and all(not r.error for r in retried)
    assert_nothing_leaked(cluster)
