"""Simulate elastic prefill/decode at scale: goodput of elastic vs every static split.

The real controller policy, router choice, decode-instance choice and engine schedulers, driven
by a discrete-event clock, with step times from a cost model fitted to measured GPU steps
(default: benchmarks/results/gpu_h100_decode.json + gpu_h100_pd.json; see
cluster/elastic/sim/cost.py). Prints markdown tables (and writes them with --out).

    python benchmarks/simulate.py                                  # 64 and 256 instances
    python benchmarks/simulate.py --instances 8 --phase-s 30       # quick
    python benchmarks/simulate.py --instances 64 --fail-at 90 --fail-fraction 0.125
    python benchmarks/simulate.py --replay-bench bench.json \
        --config configs/gpu-llama3-8b-1p1d.yaml \
        --cost-decode h200_decode.json --cost-pd h200_pd.json     # simulated vs measured
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cluster.config import load_config  # noqa: E402
from cluster.elastic.sim.cluster import SimSettings  # noqa: E402
from cluster.elastic.sim.cost import fit_cost_model  # noqa: E402
from cluster.elastic.sim.run import Failure  # noqa: E402
from cluster.elastic.sim.scenarios import (  # noqa: E402
    Mix,
    compare_jobs,
    replay_bench,
    roles_line,
    run_all,
    split_table,
    validation_table,
)
from cluster.elastic.sim.workload import read_trace  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "gpu-llama3-8b-elastic.yaml"))
    p.add_argument("--cost-decode", default=str(RESULTS / "gpu_h100_decode.json"))
    p.add_argument(
        "--cost-pd", default=str(RESULTS / "gpu_h100_pd.json"), help="gpu_pd.py JSON, or none"
    )
    p.add_argument("--instances", type=int, nargs="+", default=[64, 256])
    p.add_argument("--phase-s", type=float, default=60.0, help="length of each phase")
    p.add_argument("--rate-a", type=float, default=22.0, help="phase A req/s per 4 instances")
    p.add_argument("--rate-b", type=float, default=100.0, help="phase B req/s per 4 instances")
    p.add_argument(
        "--quantum",
        type=int,
        default=0,
        help="real tokens per simulated token (0: 1 up to 8 instances, 16 up to 64, 32 beyond)",
    )
    p.add_argument("--switch-s", type=float, default=1.0, help="drained -> serving in new role")
    p.add_argument("--startup-s", type=float, default=30.0, help="a crashed instance's restart")
    p.add_argument("--fail-at", type=float, default=None, help="crash instances at this time")
    p.add_argument("--fail-fraction", type=float, default=0.125)
    p.add_argument("--replay-bench", default=None, help="a `pdserve bench --json` file")
    p.add_argument("--trace", default=None, help="a JSONL trace instead of the two-phase mix")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--out", default=None, help="also write the tables to this markdown file")
    return p.parse_args()


def quantum_for(instances: int, asked: int) -> int:
    if asked:
        return asked
    # 16 stays within a few percent of exact runs (tests/unit/elastic); 64 does not.
    return 1 if instances <= 8 else 16


def main() -> int:
    args = parse_args()
    config = load_config(args.config)
    cost = fit_cost_model(args.cost_decode, None if args.cost_pd == "none" else args.cost_pd)
    out = [f"cost model fitted to {cost.source}; config {Path(args.config).name}"]
    print(out[0], flush=True)
    if args.replay_bench:
        settings = SimSettings(quantum=args.quantum or 1, switch_s=args.switch_s)
        simulated, measured = replay_bench(config, cost, args.replay_bench, settings)
        out.append(validation_table(simulated, measured))
    else:
        mix = Mix(phase_s=args.phase_s, rate_a=args.rate_a, rate_b=args.rate_b)
        slo = {"ttft": config.slo.ttft_ms, "tpot": config.slo.tpot_ms}
        out.append(
            f"SLO TTFT {config.slo.ttft_ms:.0f} ms, TPOT {config.slo.tpot_ms:.0f} ms; phase A "
            f"{mix.input_a}/{mix.output_a} tokens at {mix.rate_a:g} req/s per 4 instances, "
            f"phase B {mix.input_b}/{mix.output_b} at {mix.rate_b:g}, {mix.phase_s:.0f} s each"
        )
        for n in args.instances:
            settings = SimSettings(
                quantum=quantum_for(n, args.quantum),
                switch_s=args.switch_s,
                startup_s=args.startup_s,
            )
            failures = ()
            if args.fail_at is not None:
                failures = (Failure(args.fail_at, max(1, round(n * args.fail_fraction))),)
            trace = read_trace(args.trace) if args.trace else None
            jobs = compare_jobs(config, cost, n, mix, settings, args.seed, failures, trace)
            results = run_all(jobs, args.jobs)
            first = len(out)
            title = f"\n### {n} instances (quantum {settings.quantum})"
            if failures:
                title += f", {failures[0].count} crash at {args.fail_at:g} s"
            out += [title, split_table(n, results, slo)]
            elastic = results[-1]
            out.append(f"\nelastic P:D over time: {roles_line(elastic)}")
            out += [f"- {d.time_s:.0f}s {d.describe()}" for d in elastic.timeline.decisions[:12]]
            if len(elastic.timeline.decisions) > 12:
                out.append(f"- ... {len(elastic.timeline.decisions) - 12} more decisions")
            print("\n".join(out[first:]), flush=True)
    text = "\n".join(out) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    if args.replay_bench:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
