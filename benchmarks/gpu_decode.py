"""Decode TPOT, step gaps and prefill rate on one GPU, against ceilings measured in the same run.

    . .devbundle/activate.sh && python3 benchmarks/gpu_decode.py [--out results.json]

For a Llama-3-8B-shaped and a SmolLM2-135M-shaped model with random bf16 weights (no download;
the KV cache is filled with random values too), through the real EngineCore in the decode role
(requests enter as if their KV had arrived from a prefill instance):
- TPOT at batch 1, 8, 32, 128 with a 1k context, overlap schedule off and on (CUDA graphs and
  the Triton backend on): wall time per engine step in steady state;
- the memory floor of a step: (weights read + KV read) / device copy bandwidth (read + write);
- the median GPU idle gap between steps: CUDA events around each step (the event at a step's
  start completes when the GPU reaches it, so end(N) -> start(N+1) is time the GPU had no work);
- prefill tokens/s of the 8B shape at 1k and 4k prompts, as a fraction of the bf16 matmul rate.
Prints one table; --out also writes every number as JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.model_folders

from benchmarks.model_folders import SHAPES, write_model_folder
from engine.batch import ScheduledChunk, SchedulerOutput
from engine.config import EngineConfig, ModelConfig, Role
from engine.request import Request
from engine.sampling_params import SamplingParams
from worker.engine_core import EngineCore
from worker.model_config import ModelArchConfig

CONTEXT = 1024
BATCHES = (1, 8, 32, 128)
WARMUP_STEPS = 8
MEASURED_STEPS = 40
PREFILL_LENGTHS = (1024, 4096)


def weight_bytes(a: ModelArchConfig) -> int:
    """bf16 bytes a decode step reads: every layer matrix and the lm_head (the embedding table
    is only gathered from: a few rows)."""
    per_layer = a.hidden_size * (2 * a.q_size + 2 * a.kv_size + 3 * a.intermediate_size)
    return 2 * (a.num_layers * per_layer + a.vocab_size * a.hidden_size)


@dataclass
class Row:
    model: str
    batch: int
    overlap: bool
    tpot_ms: float
    floor_ms: float
    device_ms: float  # median GPU time of one step (start event -> end event)
    gap_us: float  # median GPU idle time between steps

    @property
    def ratio(self) -> float:
        return self.tpot_ms / self.floor_ms


@dataclass
class Results:
    copy_bw: float = 0.0  # bytes/s, read + write
    matmul_flops: float = 0.0
    rows: list[Row] = field(default_factory=list)
    prefill: dict[int, tuple[float, float]] = field(default_factory=dict)  # n -> (tok/s, frac)
    notes: list[str] = field(default_factory=list)


def time_cuda(fn, reps: int) -> float:
    """Median seconds of `fn` over `reps` runs, timed with CUDA events after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def measure_ceilings(results: Results) -> None:
    results.copy_bw = measure_copy_bandwidth()
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    results.matmul_flops = 2 * n**3 / time_cuda(lambda: a @ b, 20)


def measure_copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device copy, counting what is read and what is written."""
    src = torch.randn(2**29, device="cuda", dtype=torch.bfloat16)  # random data, not zeros
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / time_cuda(lambda: dst.copy_(src), 20)


def make_core(name: str, folder: Path) -> EngineCore:
    shape = SHAPES[name]
    write_model_folder(folder, shape)
    blocks_per_seq = -(-(CONTEXT + WARMUP_STEPS + MEASURED_STEPS + 8) // 16)
    engine = EngineConfig.model_validate(
        {
            "scheduler": {
                "max_num_seqs": max(BATCHES),
                "max_num_batched_tokens": max(PREFILL_LENGTHS),
                "block_size": 16,
                # block-table rows are max_model_len wide: the 4k prefill must fit one
                "max_model_len": max(PREFILL_LENGTHS),
            },
            "cache": {"num_blocks": blocks_per_seq * max(BATCHES) + 8},
        }
    )
    model = ModelConfig(path=str(folder), device="cuda", dtype="bfloat16", load_format="random")
    core = EngineCore(model, engine, Role.DECODE, overlap=False)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for layer in core.runner.kv_cache.layers:  # never time attention on zeros
        layer.normal_(generator=gen)
    return core


def run_decode(core: EngineCore, name: str, batch: int, overlap: bool) -> Row:
    rng = random.Random(batch)
    vocab = core.arch.vocab_size
    steps = WARMUP_STEPS + MEASURED_STEPS
    params = SamplingParams(temperature=0, max_tokens=steps + 4, ignore_eos=True)
    ids = [f"{name}-{batch}-{overlap}-{i}" for i in range(batch)]
    for rid in ids:
        request = Request(rid, [rng.randrange(vocab) for _ in range(CONTEXT)], params)
        assert core.scheduler.reserve_remote(request)
        core.scheduler.start_remote(rid, rng.randrange(vocab))
    core.overlap = overlap
    for _ in range(WARMUP_STEPS):
        core.step()
    runner = core.runner
    runner.step_events = []
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(MEASURED_STEPS):
        core.step()
    torch.cuda.synchronize()
    tpot = (time.perf_counter() - t0) / MEASURED_STEPS
    events, runner.step_events = runner.step_events, None
    for rid in ids:
        core.abort_request(rid)
    while core.has_work():
        core.step()
    gaps = [end.elapsed_time(nxt) for (_, end), (nxt, _) in itertools.pairwise(events)]
    busy = [start.elapsed_time(end) for start, end in events]
    return Row(
        model=name,
        batch=batch,
        overlap=overlap,
        tpot_ms=tpot * 1e3,
        floor_ms=0.0,
        device_ms=statistics.median(busy),
        gap_us=statistics.median(gaps) * 1e3,
    )


def kv_bytes_per_token(core: EngineCore) -> int:
    a = core.arch
    return 2 * a.num_layers * a.num_kv_heads * a.head_dim * 2  # K and V, bf16


def run_prefill(core: EngineCore, length: int, results: Results) -> None:
    rng = random.Random(length)
    tokens = [rng.randrange(core.arch.vocab_size) for _ in range(length)]
    blocks = list(range(-(-length // 16)))  # no request holds blocks between decode runs
    params = SamplingParams(temperature=0)
    step = [0]

    def prefill() -> None:
        step[0] += 1
        chunk = ScheduledChunk("prefill", tokens, 0, blocks, True, params)
        core.runner.execute_model(SchedulerOutput(step[0], [chunk]))

    seconds = time_cuda(prefill, 5)
    a = core.arch
    linear_params = (
        a.num_layers
        * a.hidden_size
        * (a.q_size + 2 * a.kv_size + a.q_size + 3 * a.intermediate_size)
    )
    attention = 2 * a.num_layers * a.num_heads * a.head_dim * length * length  # causal half
    flops = 2 * linear_params * length + attention
    results.prefill[length] = (length / seconds, flops / seconds / results.matmul_flops)


def bench_model(name: str, results: Results, prefill: bool) -> None:
    with tempfile.TemporaryDirectory() as folder:
        t0 = time.perf_counter()
        core = make_core(name, Path(folder))
        results.notes.append(f"{name}: start-up with graph capture {time.perf_counter() - t0:.1f}s")
        for batch in BATCHES:
            for overlap in (False, True):
                row = run_decode(core, name, batch, overlap)
                kv = batch * (CONTEXT + WARMUP_STEPS) * kv_bytes_per_token(core)
                row.floor_ms = (weight_bytes(core.arch) + kv) / results.copy_bw * 1e3
                results.rows.append(row)
        if prefill:
            for length in PREFILL_LENGTHS:
                run_prefill(core, length, results)
        del core
        torch.cuda.empty_cache()


def print_table(results: Results) -> None:
    print(f"\ndevice: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"copy bandwidth (read+write): {results.copy_bw / 1e12:.2f} TB/s; ", end="")
    print(f"bf16 matmul 8192^3: {results.matmul_flops / 1e12:.0f} TFLOP/s")
    print("| model | batch | overlap | TPOT ms | floor ms | TPOT/floor | GPU ms/step | gap us |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results.rows:
        print(
            f"| {r.model} | {r.batch} | {'on' if r.overlap else 'off'} | {r.tpot_ms:.3f} | "
            f"{r.floor_ms:.3f} | {r.ratio:.2f} | {r.device_ms:.3f} | {r.gap_us:.0f} |"
        )
    for name in SHAPES:
        rows = {(r.batch, r.overlap): r for r in results.rows if r.model == name}
        if (32, False) in rows:
            gain = rows[(32, False)].tpot_ms / rows[(32, True)].tpot_ms - 1
            print(f"{name}: overlap decode throughput gain at batch 32: {gain * 100:+.1f}%")
    for length, (tps, frac) in results.prefill.items():
        print(f"llama3-8b prefill {length} tokens: {tps:,.0f} tok/s = {frac * 100:.0f}% of matmul")
    for note in results.notes:
        print(note)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write all numbers as JSON here")
    parser.add_argument("--models", nargs="*", default=list(SHAPES))
    args = parser.parse_args()
    results = Results()
    measure_ceilings(results)
    for name in args.models:
        bench_model(name, results, prefill=name == "llama3-8b")
    print_table(results)
    if args.out:
        rows = [r.__dict__ | {"ratio": r.ratio} for r in results.rows]
        data = {**results.__dict__, "rows": rows}
        args.out.write_text(json.dumps(data, indent=1, default=str))


if __name__ == "__main__":
    main()
