"""Prefill of one prompt on one GPU: the paged Triton kernel against FlashAttention (torch SDPA),
as a fraction of the matmul rate of the same GEMMs, measured in the same run.

    . .devbundle/activate.sh && python3 benchmarks/gpu_prefill.py [--lengths 1024 4096 8192]
        [--reps 7] [--out results.json]

Llama-3-8B shape with random bf16 weights, one ModelRunner (no scheduler; no CUDA graphs: a
prefill step runs eagerly anyway). Each prompt runs as one chunk from position 0, as the
scheduler sends a fresh prompt that fits the step budget, with `prefill_attention` paged (every
chunk on the paged Triton kernel) and auto (such a chunk goes to FlashAttention); the backend's
switch is flipped between runs of the same model.
For each length:
- matmul ms: the model's GEMMs at that many rows (qkv, o, gate_up, down, times the layers),
  each timed alone: the time of a step that did nothing but its matmuls;
- per path: the step time (CUDA events around `execute_model`, median of --reps after two
  warm-up runs) and its rate, model FLOPs (linear + causal attention) / time, as a percentage of
  the same-shape GEMM rate (linear FLOPs / matmul ms) and of the 8192^3 bf16 matmul rate (the
  figure benchmarks/gpu_decode.py prints: 75% at 4k before this switch).
Goal (issue 15): 4k prefill >= 85% of the matmul rate. Runs in about a minute on an H200.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.*

from benchmarks.gpu_decode import time_cuda as time_cuda_s
from benchmarks.model_folders import SHAPES, write_model_folder
from engine.batch import ScheduledChunk, SchedulerOutput
from engine.sampling_params import SamplingParams
from worker.model_config import ModelArchConfig

DEFAULT_LENGTHS = (1024, 4096, 8192)
WARMUP_RUNS = 2
GEMM_REPS = 20
BLOCK_SIZE = 16
GOAL_LENGTH, GOAL_PERCENT = 4096, 85.0


@dataclass
class Row:
    tokens: int
    matmul_ms: float  # the step's GEMMs alone
    paged_ms: float
    flash_ms: float
    linear_flops: float
    attention_flops: float
    same_token: bool  # both paths sampled the same next token (a sanity check, not a test)

    def rate(self, ms: float) -> float:
        return (self.linear_flops + self.attention_flops) / (ms / 1e3)

    @property
    def gemm_rate(self) -> float:
        return self.linear_flops / (self.matmul_ms / 1e3)


@dataclass
class Results:
    device: str = ""
    torch_version: str = ""
    square_matmul_flops: float = 0.0  # bf16 8192^3
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def gemm_shapes(a: ModelArchConfig) -> list[tuple[int, int]]:
    """(in, out) of each projection of one layer, in forward order."""
    return [
        (a.hidden_size, a.q_size + 2 * a.kv_size),  # qkv
        (a.q_size, a.hidden_size),  # o_proj
        (a.hidden_size, 2 * a.intermediate_size),  # gate_up
        (a.intermediate_size, a.hidden_size),  # down
    ]


def linear_flops(a: ModelArchConfig, tokens: int) -> float:
    """Multiply-adds x 2 of every layer's projections for `tokens` rows (no lm_head: only
    the one sampled row goes through it)."""
    return 2.0 * tokens * a.num_layers * sum(i * o for i, o in gemm_shapes(a))


def attention_flops(a: ModelArchConfig, tokens: int) -> float:
    """q.k and p.v over the causal half of a `tokens` x `tokens` square, every layer."""
    return 2.0 * 2 * a.num_layers * a.num_heads * a.head_dim * tokens * tokens / 2


def time_cuda(fn, reps: int, warmup: int = WARMUP_RUNS) -> float:
    """Median milliseconds of `fn` after `warmup` runs (gpu_decode.py's CUDA-event timer)."""
    for _ in range(warmup - 1):  # the timer runs one more itself
        fn()
    return 1e3 * time_cuda_s(fn, reps)


def measure_square_matmul(n: int = 8192) -> float:
    gen = torch.Generator(device="cuda").manual_seed(0)
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in "ab")
    return 2 * n**3 / (time_cuda(lambda: a @ b, GEMM_REPS) / 1e3)


def measure_gemms(a: ModelArchConfig, tokens: int) -> float:
    """Milliseconds of one step's GEMMs at `tokens` rows, each shape timed alone on random
    data (never zeros), times the layers."""
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    total = 0.0
    for fan_in, fan_out in gemm_shapes(a):
        x = torch.randn(tokens, fan_in, device="cuda", dtype=torch.bfloat16, generator=gen)
        w = torch.randn(fan_out, fan_in, device="cuda", dtype=torch.bfloat16, generator=gen)
        total += time_cuda(lambda x=x, w=w: F.linear(x, w), GEMM_REPS)
        del x, w
    return total * a.num_layers


def make_runner(folder: Path, max_tokens: int):
    from worker.model_runner import ModelRunner

    write_model_folder(folder, SHAPES["llama3-8b"])
    runner = ModelRunner(
        folder,
        dtype="bfloat16",
        device="cuda",
        block_size=BLOCK_SIZE,
        num_blocks=-(-max_tokens // BLOCK_SIZE) + 8,
        prefill_attention="auto",
        cuda_graphs=False,
        max_model_len=max_tokens,
        load_format="random",
    )
    assert runner.attention.name == "triton", "needs the Triton backend (CUDA + triton)"
    assert runner.attention.flash_prefill, "prefill_attention auto did not turn FlashAttention on"
    return runner


def time_prefill(runner, tokens: int, flash: bool, reps: int) -> tuple[float, int]:
    """(median ms, sampled token) of a `tokens`-long prompt as one chunk from position 0."""
    gen = torch.Generator().manual_seed(tokens)
    prompt = torch.randint(2, runner.config.vocab_size, (tokens,), generator=gen).tolist()
    blocks = list(range(-(-tokens // BLOCK_SIZE)))
    params = SamplingParams(temperature=0)
    runner.attention.flash_prefill = flash
    step = [0]
    sampled: list[int | None] = []

    def prefill() -> None:
        step[0] += 1
        chunk = ScheduledChunk(f"p{tokens}", prompt, 0, blocks, True, params)
        sampled[:] = runner.execute_model(SchedulerOutput(step[0], [chunk])).sampled_token_ids

    ms = time_cuda(prefill, reps)
    token = sampled[0]
    assert token is not None
    return ms, token


def run(lengths: list[int], reps: int) -> Results:
    results = Results(torch.cuda.get_device_name(), torch.__version__)
    results.square_matmul_flops = measure_square_matmul()
    with tempfile.TemporaryDirectory() as folder:
        t0 = time.perf_counter()
        runner = make_runner(Path(folder), max(lengths))
        results.notes.append(f"model build (random weights): {time.perf_counter() - t0:.1f} s")
        arch = runner.config
        for tokens in lengths:
            paged_ms, paged_token = time_prefill(runner, tokens, flash=False, reps=reps)
            flash_ms, flash_token = time_prefill(runner, tokens, flash=True, reps=reps)
            row = Row(
                tokens=tokens,
                matmul_ms=measure_gemms(arch, tokens),
                paged_ms=paged_ms,
                flash_ms=flash_ms,
                linear_flops=linear_flops(arch, tokens),
                attention_flops=attention_flops(arch, tokens),
                same_token=paged_token == flash_token,
            )
            results.rows.append(row)
            print_row(row)  # progress, in case the run is cut short
    return results


def print_row(r: Row) -> None:
    print(
        f"{r.tokens} tokens: matmul {r.matmul_ms:.2f} ms, paged {r.paged_ms:.2f} ms, "
        f"flash {r.flash_ms:.2f} ms",
        flush=True,
    )


def print_table(results: Results) -> None:
    square = results.square_matmul_flops
    print(f"\ndevice: {results.device}, torch {results.torch_version}")
    print(f"bf16 matmul 8192^3: {square / 1e12:.0f} TFLOP/s (in this run)")
    print(
        "| tokens | GEMMs alone ms | GEMM TFLOP/s | attention | step ms | TFLOP/s "
        "| % of same-shape GEMM rate | % of 8192^3 rate | same token |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results.rows:
        for name, ms in (("paged", r.paged_ms), ("flash", r.flash_ms)):
            rate = r.rate(ms)
            print(
                f"| {r.tokens} | {r.matmul_ms:.2f} | {r.gemm_rate / 1e12:.0f} | {name} | "
                f"{ms:.2f} | {rate / 1e12:.0f} | {100 * rate / r.gemm_rate:.1f} | "
                f"{100 * rate / square:.1f} | {'yes' if r.same_token else 'NO'} |"
            )
    for r in results.rows:
        if r.tokens == GOAL_LENGTH:
            got = 100 * r.rate(r.flash_ms) / r.gemm_rate
            verdict = "met" if got >= GOAL_PERCENT else "NOT met"
            print(
                f"goal: {GOAL_LENGTH} prefill >= {GOAL_PERCENT:.0f}% of the matmul rate: ", end=""
            )
            print(f"{got:.1f}% with FlashAttention ({verdict}); speed-up over paged ", end="")
            print(f"{r.paged_ms / r.flash_ms:.2f}x")
    for note in results.notes:
        print(note)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS), help="prompt lengths"
    )
    parser.add_argument("--reps", type=int, default=7, help="timed runs per length and path")
    parser.add_argument("--out", type=Path, help="write every number as JSON here")
    args = parser.parse_args(argv)
    if min(args.lengths) < 2 or args.reps < 1:
        parser.error("lengths must be >= 2 and reps >= 1")
    if max(args.lengths) > SHAPES["llama3-8b"]["max_position_embeddings"]:
        parser.error("lengths must fit the model's max_position_embeddings (8192)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("gpu_prefill needs a CUDA GPU")
    results = run(args.lengths, args.reps)
    print_table(results)
    if args.out:
        data = asdict(results)
        args.out.write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
