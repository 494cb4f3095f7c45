"""Tensor parallelism on two GPUs: decode TPOT and prefill rate against ceilings of the same run.

    python3 benchmarks/gpu_tp.py [--out results.json] [--skip-70b] [--skip-8b]

Random bf16 weights (no download), through the real EngineCore (decode role, overlap schedule
and CUDA graphs on, as a decode instance runs) with engine.tensor_parallel_size 2: rank 0 in
this process on cuda:0, rank 1 a spawned process on cuda:1, joined by NCCL.
- Llama-3-70B shape at TP 2: decode TPOT at batch 1, 32 and 128 with a 1k context, next to the
  floor = (per-GPU weight bytes + per-GPU KV bytes) / device copy bandwidth (measured here), and
  the all-reduce time of the step's activations (measured here on the same two GPUs); a decode
  step does 2 all-reduces per layer plus one for the embedding, so their sum is printed too.
- its 4k-token prefill rate as a fraction of the bf16 matmul rate of the two GPUs;
- Llama-3-8B shape: batch-1 TPOT at TP 1 and TP 2, and the speed-up.
Goals (issue #12): 70B batch-1 TPOT <= 1.3x floor; 4k prefill >= 60% of the matmul rate.
Prints one table; --out writes every number as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.*

from benchmarks.gpu_decode import (
    MEASURED_STEPS,
    WARMUP_STEPS,
    measure_copy_bandwidth,
    run_decode,
    time_cuda,
    weight_bytes,
)
from benchmarks.model_folders import _LLAMA, SHAPES, write_model_folder
from engine.batch import ScheduledChunk, SchedulerOutput
from engine.config import EngineConfig, ModelConfig, Role
from engine.sampling_params import SamplingParams
from worker.engine_core import EngineCore

CONTEXT = 1024
BATCHES_70B = (1, 32, 128)
PREFILL = 4096
AR_HIDDEN = 8192  # the all-reduces measured alone: activations of the 70B shape
LLAMA3_70B = _LLAMA | {
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "rope_theta": 500000.0,
    "max_position_embeddings": 8192,
    "torch_dtype": "bfloat16",
}


@dataclass
class Row:
    model: str
    tp: int
    batch: int
    tpot_ms: float
    floor_ms: float
    device_ms: float
    gap_us: float
    all_reduce_ms: float  # one step's all-reduces (2 per layer + 1), measured alone

    @property
    def ratio(self) -> float:
        return self.tpot_ms / self.floor_ms


@dataclass
class Results:
    copy_bw: float = 0.0  # bytes/s of one GPU, read + write
    matmul_flops: float = 0.0  # one GPU
    all_reduce_us: dict[int, float] = field(default_factory=dict)  # rows of [rows, 8192] -> us
    rows: list[Row] = field(default_factory=list)
    prefill: dict[str, float] = field(default_factory=dict)
    speedup_8b: float | None = None
    notes: list[str] = field(default_factory=list)


def _all_reduce_rank(rank: int, port: int, sizes: list[int], hidden: int, out) -> None:
    torch.cuda.set_device(rank)
    timeout = datetime.timedelta(seconds=120)
    store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, timeout=timeout)
    device = torch.device("cuda", rank)
    dist.init_process_group("nccl", store=store, rank=rank, world_size=2, device_id=device)
    times = {}
    for rows in sizes:
        x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
        for _ in range(5):
            dist.all_reduce(x)
        times[rows] = time_cuda(lambda x=x: dist.all_reduce(x), 50) * 1e6
    if rank == 0:
        out.put(times)
    dist.destroy_process_group()


def measure_all_reduce(sizes: list[int], hidden: int) -> dict[int, float]:
    """Median microseconds of one bf16 all-reduce of `[rows, hidden]` over cuda:0 and cuda:1."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = random.Random().randrange(20000, 40000)
    procs = [
        ctx.Process(target=_all_reduce_rank, args=(r, port, sizes, hidden, out)) for r in range(2)
    ]
    for p in procs:
        p.start()
    times = out.get(timeout=300)
    for p in procs:
        p.join(60)
    return times


def measure_matmul_rate(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return 2 * n**3 / time_cuda(lambda: a @ b, 20)


def make_core(shape: dict, folder: Path, tp: int, batches: tuple[int, ...]) -> EngineCore:
    write_model_folder(folder, shape)
    blocks_per_seq = -(-(CONTEXT + WARMUP_STEPS + MEASURED_STEPS + 8) // 16)
    engine = EngineConfig.model_validate(
        {
            "scheduler": {
                "max_num_seqs": max(batches),
                "max_num_batched_tokens": PREFILL,
                "block_size": 16,
                "max_model_len": 2 * PREFILL,
            },
            "cache": {"num_blocks": max(blocks_per_seq * max(batches), PREFILL // 16) + 8},
            "tensor_parallel_size": tp,
            "tensor_parallel_timeout_s": 600,
        }
    )
    model = ModelConfig(path=str(folder), device="cuda", dtype="bfloat16", load_format="random")
    core = EngineCore(model, engine, Role.DECODE, overlap=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for layer in core.runner.kv_cache.layers:  # rank 0's; never time attention on zeros
        layer.normal_(generator=gen)
    return core


def decode_rows(core: EngineCore, name: str, tp: int, batches, results: Results) -> None:
    a = core.arch
    per_gpu_weights = weight_bytes(a) / tp
    kv_per_token = 2 * a.num_layers * a.num_kv_heads * a.head_dim * 2 / tp  # K and V, bf16
    for batch in batches:
        base = run_decode(core, f"{name}-tp{tp}", batch, overlap=True)
        kv = batch * (CONTEXT + WARMUP_STEPS) * kv_per_token
        reduce_ms = 0.0
        if tp > 1 and a.hidden_size == AR_HIDDEN and batch in results.all_reduce_us:
            reduce_ms = (2 * a.num_layers + 1) * results.all_reduce_us[batch] / 1e3
        results.rows.append(
            row := Row(
                model=name,
                tp=tp,
                batch=batch,
                tpot_ms=base.tpot_ms,
                floor_ms=(per_gpu_weights + kv) / results.copy_bw * 1e3,
                device_ms=base.device_ms,
                gap_us=base.gap_us,
                all_reduce_ms=reduce_ms,
            )
        )
        print(
            f"  {name} TP {tp} batch {batch}: {row.tpot_ms:.2f} ms (floor {row.floor_ms:.2f})",
            flush=True,
        )


def prefill_fraction(core: EngineCore, tp: int, results: Results) -> float:
    """Fraction of the `tp` GPUs' matmul rate a PREFILL-token prompt runs at."""
    rng = random.Random(PREFILL)
    tokens = [rng.randrange(core.arch.vocab_size) for _ in range(PREFILL)]
    blocks = list(range(PREFILL // 16))
    params = SamplingParams(temperature=0)
    step = [10**6]

    def prefill() -> None:
        step[0] += 1
        chunk = ScheduledChunk("prefill", tokens, 0, blocks, True, params)
        core.runner.execute_model(SchedulerOutput(step[0], [chunk]))

    seconds = time_cuda(prefill, 5)
    a = core.arch
    linear = a.num_layers * a.hidden_size * (2 * a.q_size + 2 * a.kv_size + 3 * a.intermediate_size)
    attention = 2 * a.num_layers * a.num_heads * a.head_dim * PREFILL * PREFILL  # causal half
    flops = 2 * linear * PREFILL + attention + 2 * a.vocab_size * a.hidden_size
    results.notes.append(f"{PREFILL}-token prefill at TP {tp}: {seconds * 1e3:.0f} ms")
    return flops / seconds / (tp * results.matmul_flops)


def bench(shape: dict, name: str, tp: int, batches, results: Results, prefill: bool):
    with tempfile.TemporaryDirectory() as folder:
        t0 = time.perf_counter()
        core = make_core(shape, Path(folder), tp, batches)
        results.notes.append(f"{name} TP {tp}: start-up {time.perf_counter() - t0:.0f} s")
        print(results.notes[-1], flush=True)
        try:
            decode_rows(core, name, tp, batches, results)
            if prefill:
                results.prefill[f"{name} TP {tp}"] = prefill_fraction(core, tp, results)
        finally:
            if hasattr(core.runner, "shutdown"):
                core.runner.shutdown()
            del core
            torch.cuda.empty_cache()


def print_table(results: Results) -> None:
    gpus = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}"
    print(f"\n{gpus}, torch {torch.__version__}")
    print(f"copy bandwidth (read+write, one GPU): {results.copy_bw / 1e12:.2f} TB/s; ", end="")
    print(f"bf16 matmul 8192^3 (one GPU): {results.matmul_flops / 1e12:.0f} TFLOP/s")
    sizes = ", ".join(f"[{n}, 8192]: {us:.1f} us" for n, us in results.all_reduce_us.items())
    print(f"NCCL all-reduce bf16 over 2 GPUs: {sizes}")
    print(
        "| model | TP | batch | TPOT ms | floor ms | TPOT/floor | all-reduce ms/step "
        "| GPU ms/step | gap us |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results.rows:
        print(
            f"| {r.model} | {r.tp} | {r.batch} | {r.tpot_ms:.2f} | {r.floor_ms:.2f} | "
            f"{r.ratio:.2f} | {r.all_reduce_ms:.2f} | {r.device_ms:.2f} | {r.gap_us:.0f} |"
        )
    for what, frac in results.prefill.items():
        print(f"{what} prefill {PREFILL} tokens: {frac * 100:.0f}% of the GPUs' matmul rate")
    if results.speedup_8b is not None:
        print(f"llama3-8b batch 1: TP 2 is {results.speedup_8b:.2f}x the speed of TP 1")
    for note in results.notes:
        print(note)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write all numbers as JSON here")
    parser.add_argument("--skip-70b", action="store_true")
    parser.add_argument("--skip-8b", action="store_true")
    args = parser.parse_args()
    if torch.cuda.device_count() < 2:
        sys.exit("gpu_tp.py needs two GPUs")
    results = Results()
    results.all_reduce_us = measure_all_reduce([*BATCHES_70B, PREFILL], AR_HIDDEN)
    results.copy_bw = measure_copy_bandwidth()
    results.matmul_flops = measure_matmul_rate()
    if not args.skip_8b:
        for tp in (1, 2):
            bench(SHAPES["llama3-8b"], "llama3-8b", tp, (1,), results, prefill=False)
        tpot = {r.tp: r.tpot_ms for r in results.rows if r.model == "llama3-8b"}
        results.speedup_8b = tpot[1] / tpot[2]
    if not args.skip_70b:
        bench(LLAMA3_70B, "llama3-70b", 2, BATCHES_70B, results, prefill=True)
    print_table(results)
    if args.out:
        rows = [asdict(r) | {"ratio": r.ratio} for r in results.rows]
        args.out.write_text(json.dumps(asdict(results) | {"rows": rows}, indent=1, default=str))


if __name__ == "__main__":
    main()
