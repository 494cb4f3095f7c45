"""The simulator replays exactly what a `pdserve bench --json` run sent."""

from __future__ import annotations

from pathlib import Path

from cluster.bench.report import write_json
from cluster.config import load_config
from cluster.elastic.sim.cluster import SimSettings
from cluster.elastic.sim.cost import fit_cost_model
from cluster.elastic.sim.run import simulate
from cluster.elastic.sim.scenarios import replay_bench, validation_table
from cluster.elastic.sim.workload import bench_trace, read_trace, write_trace
from engine.config import Role

ROOT = Path(__file__).resolve().parents[3]
RESULTS = ROOT / "benchmarks" / "results"


def test_a_bench_run_replays_to_the_same_figures(tmp_path: Path) -> None:
    config = load_config(ROOT / "configs" / "gpu-llama3-8b-1p1d.yaml")
    cost = fit_cost_model(RESULTS / "gpu_h100_decode.json")
    # What `pdserve bench --json` writes as its config (cluster/bench/cli.py: _config).
    options = {
        "dataset": "random",
        "num_prompts": 30,
        "request_rate": 4.0,
        "input_len": 1024,
        "output_len": 64,
        "range_ratio": 0.5,
        "seed": 3,
        "max_concurrency": None,
    }
    trace = bench_trace(30, 4.0, 1024, 64, 0.5, 3)
    layout = {Role.PREFILL: 1, Role.DECODE: 1}
    measured = simulate(config, cost, trace, layout, SimSettings(), elastic=False)
    path = tmp_path / "bench.json"
    write_json(path, options, measured.summary, measured.records)

    replayed, summary = replay_bench(config, cost, str(path), SimSettings())
    assert [r.prompt_tokens for r in replayed.records] == [t.prompt_tokens for t in trace]
    assert [r.start_s for r in replayed.records] == [r.start_s for r in measured.records]
    table = validation_table(replayed, summary)
    assert "+0.0%" in table and "within 15%" in table and "NOT" not in table


def test_traces_round_trip_through_a_file(tmp_path: Path) -> None:
    trace = bench_trace(5, 2.0, 100, 10, 0.5, 1)
    write_trace(tmp_path / "t.jsonl", trace)
    assert read_trace(tmp_path / "t.jsonl") == trace
