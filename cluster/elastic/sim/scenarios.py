"""The experiments benchmarks/simulate.py runs, and their tables.

- `compare_splits`: at N instances, the elastic deployment (starting at 1:1) next to every
  static split (3:1, 1:1, 1:3 of prefill to decode), on the same two-phase trace;
- the same with failures: a fraction of the instances crash mid-run (Ray restarts them after
  `startup_s`), static 1:1 next to elastic;
- `replay_bench`: the exact workload of a `pdserve bench` run, simulated, next to what it
  measured (TTFT and TPOT percentiles).
"""

from __future__ import annotations

import statistics
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace

from cluster.bench.datasets import DEFAULT_RANDOM_PROMPTS
from cluster.bench.report import read_json
from cluster.config import PdserveConfig
from cluster.elastic.sim.cluster import SimSettings
from cluster.elastic.sim.cost import CostModel
from cluster.elastic.sim.run import Failure, SimResult, simulate
from cluster.elastic.sim.workload import Phase, TraceRequest, bench_trace, phased_trace
from engine.config import Role

SPLITS = ((3, 1), (1, 1), (1, 3))  # prefill : decode


@dataclass(frozen=True)
class Mix:
    """The two-phase workload, with rates per four instances (scaled to the deployment)."""

    phase_s: float = 60.0
    rate_a: float = 22.0  # phase A: long prompts, short outputs
    input_a: int = 4096
    output_a: int = 64
    rate_b: float = 100.0  # phase B: short prompts, long outputs
    input_b: int = 256
    output_b: int = 512
    range_ratio: float = 0.5

    def trace(self, instances: int, seed: int) -> list[TraceRequest]:
        scale = instances / 4
        a = Phase("A", self.phase_s, self.rate_a * scale, self.input_a, self.output_a)
        b = Phase("B", self.phase_s, self.rate_b * scale, self.input_b, self.output_b)
        a = Phase(a.name, a.duration_s, a.rate, a.input_len, a.output_len, self.range_ratio)
        b = Phase(b.name, b.duration_s, b.rate, b.input_len, b.output_len, self.range_ratio)
        return phased_trace([a, b], seed)


def layouts(instances: int) -> list[tuple[dict[Role, int], bool]]:
    """Every static split of `instances`, then elastic starting from 1:1."""
    runs = []
    for p, d in SPLITS:
        prefill = max(1, round(instances * p / (p + d)))
        runs.append(({Role.PREFILL: prefill, Role.DECODE: instances - prefill}, False))
    half = instances // 2
    runs.append(({Role.PREFILL: half, Role.DECODE: instances - half}, True))
    return runs


def _one(args: tuple) -> SimResult:
    config, cost, trace, layout, settings, elastic, failures, seed = args
    return simulate(
        config, cost, trace, layout, settings, elastic=elastic, failures=failures, seed=seed
    )


def run_all(jobs: list[tuple], workers: int) -> list[SimResult]:
    if workers <= 1:
        return [_one(job) for job in jobs]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_one, jobs))


def compare_jobs(
    config: PdserveConfig,
    cost: CostModel,
    instances: int,
    mix: Mix,
    settings: SimSettings,
    seed: int,
    failures: tuple[Failure, ...] = (),
    trace: list[TraceRequest] | None = None,
) -> list[tuple]:
    """Jobs for `run_all`: the mix's trace (or `trace`) on every layout of `instances`."""
    trace = trace if trace is not None else mix.trace(instances, seed)
    runs = layouts(instances)
    if failures:
        runs = [runs[1], runs[3]]  # static 1:1 and elastic
    return [(config, cost, trace, layout, settings, el, failures, seed) for layout, el in runs]


def split_table(instances: int, results: list[SimResult], slo: dict[str, float]) -> str:
    best_static = max(
        (r.summary.good_requests or 0 for r in results if "static" in r.label), default=0
    )
    rows = [
        f"| {instances} instances | good / requests | goodput req/s | vs best static | "
        "TTFT p50 / p90 ms | TPOT p50 / p90 ms | failed | switches | switch p50 s | sim wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        s = r.summary
        good = s.good_requests or 0
        ratio = f"{good / best_static:.2f}x" if best_static else "-"
        switches = r.timeline.switch_seconds
        p50 = f"{statistics.median(switches):.1f}" if switches else "-"
        rows.append(
            f"| {r.label} | {good} / {len(r.records)} | {s.goodput or 0:.1f} | {ratio} | "
            f"{_ms(s, 'ttft', 'median')} / {_ms(s, 'ttft', 'p90')} | "
            f"{_ms(s, 'tpot', 'median')} / {_ms(s, 'tpot', 'p90')} | {s.failed} | "
            f"{len(switches)} | {p50} | {r.wall_s:.0f} |"
        )
    return "\n".join(rows)


def roles_line(result: SimResult, every_s: float = 10.0) -> str:
    """P:D over time, one sample per `every_s`, e.g. `0s 32:32, 10s 40:24, ...`."""
    out, next_t = [], 0.0
    for t, p, d, switching in result.timeline.roles:
        if t >= next_t:
            extra = f"+{switching}" if switching else ""
            out.append(f"{t:.0f}s {p}:{d}{extra}")
            next_t = t + every_s
    return ", ".join(out)


def _ms(summary, metric: str, stat: str) -> str:
    value = summary.latency_ms.get(metric, {}).get(stat)
    return "-" if value is None else f"{value:.0f}" if value >= 100 else f"{value:.1f}"


# ---------------------------------------------------------------------------- validation
def replay_bench(
    config: PdserveConfig, cost: CostModel, bench_json: str, settings: SimSettings
) -> tuple[SimResult, dict]:
    """Simulate the workload a `pdserve bench --json` run sent; returns (simulated, measured
    summary as a dict). Only `--dataset random` runs can be replayed exactly."""
    bench_config, summary, records = read_json(bench_json)
    if bench_config.get("dataset") not in (None, "random"):
        raise ValueError(f"{bench_json}: only --dataset random runs can be replayed")
    trace = bench_trace(
        int(bench_config.get("num_prompts") or DEFAULT_RANDOM_PROMPTS),
        float(bench_config["request_rate"]),
        int(bench_config["input_len"]),
        int(bench_config["output_len"]),
        float(bench_config["range_ratio"]),
        int(bench_config["seed"]),
    )
    # What the server really produced (EOS may end a request early without --ignore-eos).
    produced = {r.index: r.output_tokens for r in records if r.success and r.output_tokens}
    trace = [replace(t, output_tokens=produced.get(t.index, t.output_tokens)) for t in trace]
    concurrency = bench_config.get("max_concurrency")
    settings = SimSettings(
        quantum=settings.quantum,
        switch_s=settings.switch_s,
        startup_s=settings.startup_s,
        max_concurrency=int(concurrency) if concurrency else None,
    )
    layout = {
        Role.PREFILL: config.prefill.instances,
        Role.DECODE: config.decode.instances,
        Role.MIXED: config.mixed.instances,
    }
    result = simulate(config, cost, trace, layout, settings, elastic=config.elastic.enabled)
    return result, summary.to_dict()


def validation_table(simulated: SimResult, measured: dict) -> str:
    rows = [
        "| metric | measured ms | simulated ms | difference |",
        "|---|---:|---:|---:|",
    ]
    worst = 0.0
    for metric in ("ttft", "tpot"):
        for stat in ("median", "p90", "p99"):
            real = measured["latency_ms"][metric][stat]
            sim = simulated.summary.latency_ms[metric][stat]
            if real is None or sim is None:
                continue
            diff = (sim - real) / real
            worst = max(worst, abs(diff))
            rows.append(f"| {metric} {stat} | {real:.1f} | {sim:.1f} | {diff:+.1%} |")
    verdict = "within 15%" if worst <= 0.15 else "NOT within 15%"
    rows.append(f"\nlargest difference {worst:.1%}: {verdict}")
    return "\n".join(rows)
