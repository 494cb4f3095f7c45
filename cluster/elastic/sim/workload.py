"""Workload traces for the simulator: arrival time, prompt and output length of each request.

- `phased_trace`: Poisson arrivals in consecutive phases, each with its own rate and lengths
  (e.g. phase A long prompts / short outputs, phase B short prompts / long outputs);
- `bench_trace`: exactly the requests `pdserve bench --dataset random` sends for the same
  options and seed (same length draws, same arrival schedule), so a simulated run can be put
  next to a measured one;
- `read_trace` / `write_trace`: a JSONL file, one {"arrival_s", "prompt_tokens",
  "output_tokens", "phase"} per line.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cluster.bench.datasets import sample_lengths
from cluster.bench.runner import arrival_schedule


@dataclass(frozen=True)
class TraceRequest:
    index: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    phase: str = ""


@dataclass(frozen=True)
class Phase:
    name: str
    duration_s: float
    rate: float  # requests per second, Poisson
    input_len: int
    output_len: int
    range_ratio: float = 0.5


def phased_trace(phases: list[Phase], seed: int = 0) -> list[TraceRequest]:
    rng = np.random.default_rng(seed)
    trace: list[TraceRequest] = []
    start = 0.0
    for phase in phases:
        t = start + rng.exponential(1.0 / phase.rate)
        while t < start + phase.duration_s:
            prompt, output = _lengths(phase, rng)
            trace.append(TraceRequest(len(trace), t, prompt, output, phase.name))
            t += rng.exponential(1.0 / phase.rate)
        start += phase.duration_s
    return trace


def _lengths(phase: Phase, rng: np.random.Generator) -> tuple[int, int]:
    (prompt,) = sample_lengths(phase.input_len, phase.range_ratio, 1, rng)
    (output,) = sample_lengths(phase.output_len, phase.range_ratio, 1, rng)
    return prompt, output


def bench_trace(
    num_prompts: int,
    request_rate: float,
    input_len: int,
    output_len: int,
    range_ratio: float,
    seed: int,
) -> list[TraceRequest]:
    """The requests of `pdserve bench --dataset random` with these options (with --ignore-eos,
    every request produces exactly its max_tokens)."""
    rng = np.random.default_rng(seed)  # as cluster/bench/datasets.random_requests draws them
    inputs = sample_lengths(input_len, range_ratio, num_prompts, rng)
    outputs = sample_lengths(output_len, range_ratio, num_prompts, rng)
    arrivals = arrival_schedule(num_prompts, request_rate, seed)
    return [
        TraceRequest(i, a, p, o, "bench")
        for i, (a, p, o) in enumerate(zip(arrivals, inputs, outputs, strict=True))
    ]


def write_trace(path: str | Path, trace: list[TraceRequest]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for request in trace:
            f.write(json.dumps(asdict(request)) + "\n")


def read_trace(path: str | Path) -> list[TraceRequest]:
    trace = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            item = json.loads(line)
            try:
                trace.append(
                    TraceRequest(
                        len(trace),
                        float(item["arrival_s"]),
                        int(item["prompt_tokens"]),
                        int(item["output_tokens"]),
                        str(item.get("phase", "")),
                    )
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{line_no}: not a trace request ({exc})") from None
    return sorted(trace, key=lambda r: r.arrival_s)
