"""Token sampling: greedy, temperature, top-k, top-p, with per-request reproducible seeds.

Sampling is Gumbel-max in its exponential form: `argmax(p / E)` with `E ~ Exp(1)` draws from `p`.
The noise of a seeded request comes from a generator seeded with (seed, num_generated), so the
token it draws depends only on its own logits, never on its neighbours in the batch or on how
many steps the runner has taken. Unseeded rows share the runner's generator.
Nothing here reads device values back to the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.sampling_params import SamplingParams

_MASK64 = (1 << 64) - 1


@dataclass
class SamplingRow:
    params: SamplingParams
    num_generated: int


def mix_seed(seed: int, num_generated: int) -> int:
    """A 63-bit generator seed from (seed, step) with neighbouring inputs far apart (splitmix64)."""
    z = (seed * 0x9E3779B97F4A7C15 + num_generated + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self._row_generator = torch.Generator(device=device)

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """logits `[N, V]` -> sampled token ids `[N]` (int64, on the logits' device)."""
        assert logits.shape[0] == len(rows)
        if all(r.params.greedy for r in rows):
            return logits.argmax(dim=-1)  # [N]
        greedy = logits.argmax(dim=-1)  # [N]
        probs = self._probs(logits.float(), rows)  # [N, V]
        noise = self._exponential_noise(probs.shape, rows)  # [N, V]
        sampled = (probs / noise).argmax(dim=-1)  # [N]
        is_greedy = torch.tensor([r.params.greedy for r in rows]).to(logits.device)  # [N]
        return torch.where(is_greedy, greedy, sampled)  # [N]

    def _probs(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Temperature-scaled, top-k/top-p-filtered probabilities `[N, V]` (fp32)."""
        # Greedy rows get temperature 1 here; their sample is replaced by the argmax anyway.
        temps = [r.params.temperature or 1.0 for r in rows]
        logits = logits / self._column(temps, logits.dtype)  # [N, V]
        top_k = [r.params.top_k for r in rows]
        top_p = [r.params.top_p for r in rows]
        if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
            logits = self._filter_top_k_top_p(logits, top_k, top_p)  # [N, V]
        return logits.softmax(dim=-1)  # [N, V]

    def _filter_top_k_top_p(
        self, logits: torch.Tensor, top_k: list[int], top_p: list[float]
    ) -> torch.Tensor:
        vocab = logits.shape[-1]
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # [N, V] each
        ranks = torch.arange(vocab, device=logits.device)[None, :]  # [1, V]
        k = self._column([k if 0 < k < vocab else vocab for k in top_k], torch.int64)  # [N, 1]
        sorted_logits = sorted_logits.masked_fill(ranks >= k, float("-inf"))  # [N, V]
        probs = sorted_logits.softmax(dim=-1)  # [N, V]
        mass_before = probs.cumsum(dim=-1) - probs  # [N, V]
        # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
        drop = mass_before > self._column(top_p, probs.dtype)  # [N, V]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))  # [N, V]
        return torch.full_like(logits, float("-inf")).scatter_(-1, order, sorted_logits)

    def _exponential_noise(self, shape: torch.Size, rows: list[SamplingRow]) -> torch.Tensor:
        noise = torch.empty(shape, device=self.device)  # [N, V]
        seeded = [i for i, r in enumerate(rows) if r.params.seed is not None]
        if len(seeded) < len(rows):
            noise.exponential_(generator=self.generator)
        for i in seeded:
            row = rows[i]
            self._row_generator.manual_seed(mix_seed(row.params.seed or 0, row.num_generated))
            noise[i].exponential_(generator=self._row_generator)
        # A zero draw would turn a filtered-out token (probability 0) into 0 / 0 = NaN, the argmax.
        return noise.clamp_min_(torch.finfo(noise.dtype).tiny)

    def _column(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)[:, None]
