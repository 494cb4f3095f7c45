"""How long an instance's engine step takes, fitted to measured GPU steps.

One step computes prefill chunks and decode tokens together. Its time is a roofline of the
linear layers (reading the weights once, or computing every token, whichever is longer) plus
attention (prefill: causal pairs of the chunk against itself and the context before it; decode:
reading each sequence's KV):

    step = max(weights_s, token_s * tokens) + pair_s * sum(n*start + n*n/2) + kv_s * sum(context)

Fitted from `benchmarks/gpu_decode.py`'s JSON (decode TPOT at batch 1..128 with a 1024-token
context, overlap on; whole-prompt prefill at 1k and 4k tokens): decode gives weights_s and kv_s
by least squares (its batches all have the same context, so the per-sequence cost is taken as KV
reads, which the floor analysis in gpu_h100.md supports: KV bytes explain 5.8 of the 6.5 ms
between batch 1 and 128), the two prefill lengths give token_s and pair_s exactly.

A request's KV moves layer by layer while P computes, so what remains after its first token is
the last layer's bytes: transfer_fixed_s + kv_bytes_per_token * tokens / layers / bytes_per_s
(`benchmarks/gpu_pd.py`: ~60 us per WRITE, then the contiguous rate).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

# The Llama-3-8B shape the GPU figures were measured with: K and V, 8 KV heads of 128, bf16.
LLAMA3_8B_LAYERS = 32
LLAMA3_8B_KV_BYTES_PER_TOKEN = 2 * LLAMA3_8B_LAYERS * 8 * 128 * 2
DECODE_CONTEXT = 1024  # gpu_decode.py's CONTEXT
WRITE_FIXED_S = 60e-6  # gpu_h100.md: "a fixed ~60 us per WRITE, then roughly 270 GB/s"


@dataclass(frozen=True)
class CostModel:
    weights_s: float  # a step's floor: the weights read once (plus launches)
    token_s: float  # linear layers per token once compute-bound
    pair_s: float  # prefill attention per (query, key) pair
    kv_s: float  # decode attention per context token read
    transfer_fixed_s: float  # per KV write
    transfer_bytes_per_s: float
    kv_bytes_per_token: int
    num_layers: int
    prepare_s: float = 0.0  # P's blocks + D's allocation, before a request can queue on P
    source: str = ""  # which measurements it was fitted to

    def step_s(self, prefill: Iterable[tuple[int, int]], decode_contexts: Iterable[int]) -> float:
        """prefill: (start, length) of each chunk; decode_contexts: each sequence's length."""
        tokens = 0
        pairs = 0.0
        for start, length in prefill:
            tokens += length
            pairs += length * start + length * length / 2
        contexts = 0
        for context in decode_contexts:
            tokens += 1
            contexts += context
        if tokens == 0:
            return 0.0
        linear = max(self.weights_s, self.token_s * tokens)
        return linear + self.pair_s * pairs + self.kv_s * contexts

    def prefill_s(self, length: int) -> float:
        """A whole prompt in one step."""
        return self.step_s([(0, length)], [])

    def transfer_tail_s(self, prompt_tokens: int) -> float:
        """First token sampled on P -> the KV complete on D (the last layer still to move)."""
        last_layer = self.kv_bytes_per_token * prompt_tokens / self.num_layers
        return self.transfer_fixed_s + last_layer / self.transfer_bytes_per_s

    def to_dict(self) -> dict:
        return asdict(self)


def fit_cost_model(decode_json: str | Path, pd_json: str | Path | None = None) -> CostModel:
    """Fit to gpu_decode.py's `--out` JSON (and gpu_pd.py's, for transfer rate and prepare)."""
    data = json.loads(Path(decode_json).read_text())
    rows = [r for r in data["rows"] if r["model"] == "llama3-8b" and r["overlap"]]
    if len(rows) < 2 or len(data.get("prefill", {})) < 2:
        raise ValueError(f"{decode_json}: needs >= 2 llama3-8b overlap rows and 2 prefill lengths")
    weights_s, kv_s = _line_fit(
        [r["batch"] * DECODE_CONTEXT for r in rows], [r["tpot_ms"] / 1e3 for r in rows]
    )
    token_s, pair_s = _prefill_fit({int(n): v[0] for n, v in data["prefill"].items()})
    transfer_rate, prepare_s, sources = 270e9, 0.0, [Path(decode_json).name]
    if pd_json is not None:
        pd = json.loads(Path(pd_json).read_text())
        transfer_rate = pd["transfer"]["contiguous_bytes_per_s"]
        prepare = [v["split"]["prepare"]["p50_ms"] for v in pd["end_to_end"].values()]
        prepare_s = sum(prepare) / len(prepare) / 1e3
        sources.append(Path(pd_json).name)
    return CostModel(
        weights_s=weights_s,
        token_s=token_s,
        pair_s=pair_s,
        kv_s=kv_s,
        transfer_fixed_s=WRITE_FIXED_S,
        transfer_bytes_per_s=transfer_rate,
        kv_bytes_per_token=LLAMA3_8B_KV_BYTES_PER_TOKEN,
        num_layers=LLAMA3_8B_LAYERS,
        prepare_s=prepare_s,
        source=" + ".join(sources),
    )


def _line_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares y = a + b x."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return my - b * mx, b


def _prefill_fit(tokens_per_s: dict[int, float]) -> tuple[float, float]:
    """token_s and pair_s from whole-prompt prefill rates at two lengths (compute-bound, so
    time = token_s * n + pair_s * n * n / 2); the two longest lengths are used."""
    (n1, r1), (n2, r2) = sorted(tokens_per_s.items())[-2:]
    t1, t2 = n1 / r1, n2 / r2
    # t = a n + c n^2 (c = pair_s / 2): two equations, two unknowns.
    c = (t2 / n2 - t1 / n1) / (n2 - n1)
    a = t1 / n1 - c * n1
    return a, 2 * c
