"""Single-instance engine vs transformers `generate`, same model, same machine, same run.

(a) one request, 128 new tokens; (b) 16 requests with prompt lengths 16-512 and output lengths
32-256: transformers as one left-padded static batch (it must run to the longest output, so only
the tokens each request asked for are counted), the engine with continuous batching. Greedy, EOS
ignored, fp32 on CPU by default.

Each workload runs `--repeats` times; within a repetition both sides run back to back and the
side that goes first alternates between repetitions, so drift and other processes' load hit both.
The table gives each side's median output tokens/s with its range (min-max) and the median of the
per-repetition speed-ups, next to the goal; the load average before and after is printed with it.
The outputs are compared too (first repetition): greedy fp32 tokens should be identical; padding
in transformers' batch can flip a near-tie late in a long output of (b), which the table shows.

    python benchmarks/engine_vs_transformers.py [--repeats 3] [--model PATH] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from engine.config import EngineConfig, ModelConfig
from engine.sampling_params import SamplingParams
from worker.engine_core import resolve_model_path
from worker.llm import LLM

PAD_ID = 0
Tokens = list[list[int]]


@dataclass
class Workload:
    name: str
    prompts: Tokens
    outputs: list[int]  # new tokens per request
    goal: float  # speed-up the engine must reach (median)
    seconds: dict[str, list[float]] = field(default_factory=dict)  # side -> one per repetition
    tokens: dict[str, Tokens] = field(default_factory=dict)  # side -> first repetition's outputs


def workloads() -> list[Workload]:
    single = [[random.Random(1).randint(100, 20000) for _ in range(16)]]
    rng = random.Random(0)
    prompt_lens = [rng.randint(16, 512) for _ in range(16)]
    output_lens = [rng.randint(32, 256) for _ in range(16)]
    prompts = [[rng.randint(100, 20000) for _ in range(n)] for n in prompt_lens]
    return [
        Workload("(a) 1 request x 128 tokens", single, [128], goal=1.2),
        Workload("(b) 16 requests, prompts 16-512, outputs 32-256", prompts, output_lens, goal=2.0),
    ]


def hf_generate(model, prompts: Tokens, outputs: list[int]) -> tuple[float, Tokens]:
    """One left-padded static batch running max(outputs) steps: seconds, each row's tokens."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), PAD_ID, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt) :] = torch.tensor(prompt)
        mask[row, longest - len(prompt) :] = 1
    ids, mask = ids.to(model.device), mask.to(model.device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max(outputs),
            do_sample=False,
            pad_token_id=PAD_ID,
        )
    elapsed = time.perf_counter() - start
    return elapsed, [out[row, longest : longest + n].tolist() for row, n in enumerate(outputs)]


def engine_generate(llm: LLM, prompts: Tokens, outputs: list[int]) -> tuple[float, Tokens]:
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in outputs]
    start = time.perf_counter()
    completions = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    tokens = [c.token_ids for c in completions]
    assert [len(t) for t in tokens] == outputs
    return elapsed, tokens


def run(sides: dict[str, Callable[[Tokens, list[int]], tuple[float, Tokens]]], repeats: int):
    work = workloads()
    for generate in sides.values():  # warm-up (allocator, threads, lazy init), both sides
        generate(work[0].prompts, [4])
    names = list(sides)
    for rep in range(repeats):
        order = names if rep % 2 == 0 else names[::-1]
        for w in work:
            for side in order:
                seconds, tokens = sides[side](w.prompts, w.outputs)
                w.seconds.setdefault(side, []).append(seconds)
                w.tokens.setdefault(side, tokens)
            print(
                f"  repetition {rep + 1}/{repeats} {w.name[:3]}: "
                + ", ".join(f"{s} {sum(w.outputs) / w.seconds[s][-1]:.1f} tok/s" for s in order),
                flush=True,
            )
    return work


def same_tokens(ours: Tokens, theirs: Tokens) -> str:
    """'16/16 identical' or with the earliest divergence (output index) of those that differ."""
    same = sum(a == b for a, b in zip(ours, theirs, strict=True))
    text = f"{same}/{len(ours)} identical"
    firsts = [
        next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
        for a, b in zip(ours, theirs, strict=True)
        if a != b
    ]
    return text + (f" (first difference at output token {min(firsts)})" if firsts else "")


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def print_table(work: list[Workload]) -> None:
    print(
        "| workload | output tokens | transformers tok/s | pdserve tok/s "
        "| speed-up | goal | met | outputs vs transformers |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    for w in work:
        n = sum(w.outputs)
        hf = [n / s for s in w.seconds["transformers"]]
        ours = [n / s for s in w.seconds["pdserve"]]
        ratios = [
            a / b for a, b in zip(w.seconds["transformers"], w.seconds["pdserve"], strict=True)
        ]
        median = statistics.median(ratios)
        print(
            f"| {w.name} | {n} | {spread(hf)} | {spread(ours)} | {spread(ratios)}x "
            f"| >= {w.goal:g}x | {'yes' if median >= w.goal else 'NO'} "
            f"| {same_tokens(w.tokens['pdserve'], w.tokens['transformers'])} |"
        )


def load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: SmolLM2-135M)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions (median, range)")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    model_cfg = ModelConfig(path=args.model, device=args.device, dtype="float32")
    path = resolve_model_path(model_cfg)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(args.device).eval()
    hf.generation_config.eos_token_id = None  # every row runs its full length, as ignore_eos
    engine_cfg = EngineConfig.model_validate(
        {
            "scheduler": {"max_num_seqs": 16, "max_num_batched_tokens": 512},
            "cache": {"memory_mb": 1024},
        }
    )
    llm = LLM(model_cfg, engine_cfg)
    sides = {
        "transformers": lambda prompts, outputs: hf_generate(hf, prompts, outputs),
        "pdserve": lambda prompts, outputs: engine_generate(llm, prompts, outputs),
    }
    before = load()
    work = run(sides, args.repeats)
    print(
        f"\nmodel {path.name}, {args.device}, fp32, torch threads {torch.get_num_threads()}, "
        f"{args.repeats} repetitions (median (min-max)), sides alternated; "
        f"{before} before, {load()} after"
    )
    print_table(work)


if __name__ == "__main__":
    main()
