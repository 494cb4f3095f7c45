"""Goodput of every static P:D split under a workload whose mix changes mid-run (GPU machine).

Four instances of the Llama-3-8B shape (random weights), a GPU each: 3P1D, 2P2D, 1P3D and four
mixed instances, one deployment after the other, each serving the same two-phase trace (phase A:
4k-token prompts, 64-token outputs; phase B: 256 / 512) through the router with the bench
client. With `--gpus 2`: 1P1D and two mixed. Each measured row is printed next to what the
simulator predicts for the same trace and layout, with a cost model fitted to this GPU
(`gpu_decode.py --out`, run first unless --cost-decode is given).

The elastic row (`--elastic`) needs deployments that start the elastic controller and
instances that switch roles while serving; until then it stops with a clear error.

    . .devbundle/activate.sh && python3 benchmarks/elastic.py --out-dir elastic_gpu
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.model_folders import SHAPES, write_model_folder  # noqa: E402
from cluster.bench.client import OpenAIClient, RequestRecord, build_payload  # noqa: E402
from cluster.bench.datasets import BenchRequest  # noqa: E402
from cluster.bench.report import meets_slo, summarize  # noqa: E402
from cluster.config import parse_config  # noqa: E402
from cluster.elastic.sim.cluster import SimSettings  # noqa: E402
from cluster.elastic.sim.cost import fit_cost_model  # noqa: E402
from cluster.elastic.sim.run import simulate  # noqa: E402
from cluster.elastic.sim.scenarios import Mix  # noqa: E402
from cluster.elastic.sim.workload import TraceRequest  # noqa: E402
from cluster.launcher import deploy  # noqa: E402
from engine.config import Role  # noqa: E402

LAYOUTS = {
    4: [
        {"prefill": 3, "decode": 1},
        {"prefill": 2, "decode": 2},
        {"prefill": 1, "decode": 3},
        {"mixed": 4},
    ],
    2: [{"prefill": 1, "decode": 1}, {"mixed": 2}],
}


def label(layout: dict[str, int]) -> str:
    return "".join(f"{n}{role[0].upper()}" for role, n in layout.items() if n)


def config_for(folder: Path, layout: dict[str, int], elastic: bool) -> dict:
    raw = yaml.safe_load((ROOT / "configs" / "gpu-llama3-8b-elastic.yaml").read_text())
    raw["model"].update({"path": str(folder), "load_format": "random"})
    raw["router"].update({"host": "127.0.0.1", "port": 0})
    mixed = {"engine": raw["decode"]["engine"], "placement": raw["decode"]["placement"]}
    raw["mixed"] = {**mixed, "overlap_schedule": True, "instances": layout.get("mixed", 0)}
    for role in ("prefill", "decode"):
        raw[role]["instances"] = layout.get(role, 0)
    raw["elastic"]["enabled"] = elastic
    raw["cluster"] = {"startup_timeout_s": 900}
    return raw


def trace_requests(trace: list[TraceRequest], vocab: int, seed: int) -> list[BenchRequest]:
    rng = np.random.default_rng(seed)
    return [
        BenchRequest(
            [int(i) for i in rng.integers(2, vocab, t.prompt_tokens)],
            None,
            t.output_tokens,
            t.prompt_tokens,
        )
        for t in trace
    ]


async def serve_trace(url: str, trace: list[TraceRequest], requests: list[BenchRequest]):
    """Send each request at its trace time (absolute), collect every record."""
    async with OpenAIClient(url, timeout=600.0) as client:
        model = await client.first_model()
        origin = time.perf_counter()

        async def one(index: int, t: TraceRequest) -> RequestRecord:
            await asyncio.sleep(max(0.0, origin + t.arrival_s - time.perf_counter()))
            payload = build_payload(requests[index], "completions", model, 0.0, True)
            return await client.send(index, "completions", payload, origin)

        return await asyncio.gather(*(one(i, t) for i, t in enumerate(trace)))


def warm_up(url: str, vocab: int) -> None:
    model = httpx.get(f"{url}/v1/models", timeout=60).json()["data"][0]["id"]
    for length in (512, 4096):
        body = {
            "model": model,
            "prompt": list(range(2, length + 2)),
            "max_tokens": 8,
            "ignore_eos": True,
        }
        httpx.post(f"{url}/v1/completions", json=body, timeout=600).raise_for_status()


def run_layout(folder: Path, layout: dict, elastic: bool, trace, requests) -> list[RequestRecord]:
    config = parse_config(config_for(folder, layout, elastic))
    dep = deploy(config)
    try:
        if elastic and getattr(dep, "controller", None) is None:
            raise SystemExit(
                "--elastic: this deployment has no elastic controller yet (instances cannot "
                "switch roles while serving; see docs/architecture.md)"
            )
        warm_up(dep.url, SHAPES["llama3-8b"]["vocab_size"])
        return asyncio.run(serve_trace(dep.url, trace, requests))
    finally:
        dep.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=int, choices=sorted(LAYOUTS), default=4)
    p.add_argument("--phase-s", type=float, default=60.0)
    p.add_argument("--rate-a", type=float, default=14.0, help="phase A req/s (4 GPUs)")
    p.add_argument("--rate-b", type=float, default=120.0, help="phase B req/s (4 GPUs)")
    p.add_argument("--elastic", action="store_true", help="also the elastic deployment")
    p.add_argument("--cost-decode", default=None, help="gpu_decode.py JSON of this GPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=Path("elastic_gpu"))
    args = p.parse_args()
    out = args.out_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.cost_decode is None:
        args.cost_decode = str(out / "decode.json")
        cmd = [sys.executable, "benchmarks/gpu_decode.py", "--out", args.cost_decode]
        subprocess.run(cmd, check=True, cwd=ROOT)
    cost = fit_cost_model(args.cost_decode)
    mix = Mix(phase_s=args.phase_s, rate_a=args.rate_a, rate_b=args.rate_b)
    trace = mix.trace(args.gpus, args.seed)
    requests = trace_requests(trace, SHAPES["llama3-8b"]["vocab_size"], args.seed)
    runs = [(layout, False) for layout in LAYOUTS[args.gpus]]
    if args.elastic:
        runs.append((LAYOUTS[args.gpus][1 if args.gpus == 4 else 0], True))
    rows, dump = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_model_folder(Path(tmp) / "llama3-8b-random", SHAPES["llama3-8b"])
        for layout, elastic in runs:
            name = ("elastic from " if elastic else "") + label(layout)
            records = run_layout(folder, layout, elastic, trace, requests)
            config = parse_config(config_for(folder, layout, elastic))
            sim_layout = {Role(r): n for r, n in layout.items()}
            sim = simulate(
                config, cost, trace, sim_layout, SimSettings(quantum=16), elastic=elastic
            )
            rows.append((name, records, sim))
            dump[name] = [r.to_dict() for r in records]
            ray.shutdown()
    slo = {"ttft": 500.0, "tpot": 15.0}
    (out / "records.json").write_text(json.dumps(dump))
    print_table(rows, slo, len(trace))


def print_table(rows, slo: dict[str, float], total: int) -> None:
    print(f"\n{total} requests; SLO TTFT {slo['ttft']:.0f} ms, TPOT {slo['tpot']:.0f} ms")
    print(
        "| layout | good (measured) | goodput req/s | TTFT p50 / p90 | TPOT p50 / p90 | "
        "good (simulated) | TTFT p50 sim | TPOT p50 sim |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, records, sim in rows:
        duration = max(r.end_s for r in records) - min(r.start_s for r in records)
        s = summarize(records, duration, slo)
        good = sum(meets_slo(r, slo) for r in records)
        lat, sl = s.latency_ms, sim.summary.latency_ms
        print(
            f"| {name} | {good} | {s.goodput or 0:.1f} | {lat['ttft']['median']:.0f} / "
            f"{lat['ttft']['p90']:.0f} | {lat['tpot']['median']:.1f} / {lat['tpot']['p90']:.1f} "
            f"| {sim.summary.good_requests} | {sl['ttft']['median']:.0f} | "
            f"{sl['tpot']['median']:.1f} |"
        )


if __name__ == "__main__":
    main()
