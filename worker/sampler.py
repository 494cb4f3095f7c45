"""Token sampling: penalties, greedy, temperature, top-k, top-p, with per-request reproducible
seeds; and the logprobs a request asks for.

Sampling is Gumbel-max in its exponential form: `argmax(p / E)` with `E ~ Exp(1)` draws from `p`.
The noise of a seeded request comes from a generator seeded with (seed, num_generated), so the
token it draws depends only on its own logits, never on its neighbours in the batch or on how
many steps the runner has taken. Unseeded rows share the runner's generator.
Presence/frequency penalties (OpenAI's definition) shift the logits of the rows that have them
before anything else; logprobs come from the raw logits, as vLLM reports them by default.
Nothing here reads device values back to the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.outputs import TokenLogprobs
from engine.sampling_params import SamplingParams

_MASK64 = (1 << 64) - 1


@dataclass
class SamplingRow:
    params: SamplingParams
    num_generated: int
    # The request's output so far; set when params.has_penalties (negative ids are skipped).
    output_token_ids: list[int] | None = None
    # Overlap schedule: the token its request sampled in the step in flight (a 0-dim device
    # tensor, never read back), which output_token_ids holds only as a placeholder.
    in_flight_token: torch.Tensor | None = None


@dataclass
class LogprobsTensors:
    """Logprobs of the rows that asked for them, on the device until the runner copies them."""

    rows: list[int]  # sampled-row index of each row that asked
    num_top: list[int]  # alternatives each of those rows asked for
    token_logprobs: torch.Tensor  # [M] fp32: the sampled token's logprob
    top_ids: torch.Tensor  # [M, K] int64, K = max(num_top): likeliest first
    top_logprobs: torch.Tensor  # [M, K] fp32

    def to_host(self) -> LogprobsTensors:
        """Start the copy to host memory. On CUDA the copies go into pinned buffers without
        waiting, so they complete before any event recorded after this call."""
        if self.token_logprobs.device.type == "cpu":
            return self
        tensors = [self.token_logprobs, self.top_ids, self.top_logprobs]
        host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
        for dst, src in zip(host, tensors, strict=True):
            dst.copy_(src, non_blocking=True)
        return LogprobsTensors(self.rows, self.num_top, *host)

    def per_chunk(self, sample_chunks: list[int], num_chunks: int) -> list[TokenLogprobs | None]:
        """One entry per scheduled chunk (None where it did not sample or ask); host tensors."""
        out: list[TokenLogprobs | None] = [None] * num_chunks
        token_logprobs = self.token_logprobs.tolist()
        top_ids = self.top_ids.tolist()
        top_logprobs = self.top_logprobs.tolist()
        for m, row in enumerate(self.rows):
            k = self.num_top[m]
            top = [[i, lp] for i, lp in zip(top_ids[m][:k], top_logprobs[m][:k], strict=True)]
            out[sample_chunks[row]] = [token_logprobs[m], top]
        return out


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
        """logits `[N, V]` -> sampled token ids `[N]` (int64, on the logits' device).
        `logits` is not modified (the runner may still want logprobs from it)."""
        assert logits.shape[0] == len(rows)
        logits = self._apply_penalties(logits, rows)  # [N, V]
        if all(r.params.greedy for r in rows):
            return logits.argmax(dim=-1)  # [N]
        greedy = logits.argmax(dim=-1)  # [N]
        probs = self._probs(logits.float(), rows)  # [N, V]
        noise = self._exponential_noise(probs.shape, rows)  # [N, V]
        sampled = (probs / noise).argmax(dim=-1)  # [N]
        is_greedy = torch.tensor([r.params.greedy for r in rows]).to(logits.device)  # [N]
        return torch.where(is_greedy, greedy, sampled)  # [N]

    def logprobs(
        self, logits: torch.Tensor, sampled: torch.Tensor, rows: list[SamplingRow]
    ) -> LogprobsTensors | None:
        """Logprobs of the sampled tokens and the top alternatives of the rows that asked,
        from log_softmax of the raw `logits` `[N, V]`; None when no row asked (no work)."""
        wanted = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        if not wanted:
            return None
        num_top = [rows[i].params.logprobs or 0 for i in wanted]
        index = self._tensor(wanted, torch.int64)  # [M]
        logprobs = logits.index_select(0, index).float().log_softmax(dim=-1)  # [M, V]
        chosen = sampled.index_select(0, index)[:, None]  # [M, 1]
        token_logprobs = logprobs.gather(1, chosen)[:, 0]  # [M]
        k = min(max(num_top), logprobs.shape[-1])
        top_logprobs, top_ids = logprobs.topk(k, dim=-1)  # [M, K] each, sorted descending
        return LogprobsTensors(wanted, num_top, token_logprobs, top_ids, top_logprobs)

    def _apply_penalties(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """OpenAI's penalties: logit -= frequency * count + presence * (count > 0), counted over
        the row's output so far. Returns `logits` itself when no row has a penalty."""
        vocab = logits.shape[-1]
        penalized: list[int] = []
        row_of: list[int] = []
        token_ids: list[int] = []
        in_flight: list[tuple[int, torch.Tensor]] = []  # (slot, 0-dim device token)
        for i, row in enumerate(rows):
            if not row.params.has_penalties or not row.output_token_ids:
                continue  # nothing generated yet (a first token, as on P): nothing to penalize
            known = [t for t in row.output_token_ids if 0 <= t < vocab]
            token_ids += known
            row_of += [len(penalized)] * len(known)
            if row.in_flight_token is not None:
                in_flight.append((len(penalized), row.in_flight_token))
            penalized.append(i)
        if not penalized:
            return logits
        counts = torch.zeros(len(penalized), vocab, device=logits.device)  # [P, V]
        if token_ids:
            _add_counts(
                counts, self._tensor(row_of, torch.int64), self._tensor(token_ids, torch.int64)
            )
        if in_flight:  # tokens still on the device: counted there, without a host sync
            slots = self._tensor([slot for slot, _ in in_flight], torch.int64)  # [F]
            _add_counts(counts, slots, torch.stack([token for _, token in in_flight]))
        freq = self._column([rows[i].params.frequency_penalty for i in penalized], torch.float32)
        pres = self._column([rows[i].params.presence_penalty for i in penalized], torch.float32)
        index = self._tensor(penalized, torch.int64)  # [P]
        shifted = logits.index_select(0, index).float() - freq * counts - pres * (counts > 0)
        return logits.float().index_copy(0, index, shifted)  # [N, V] fp32, a new tensor

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
        return self._tensor(values, dtype)[:, None]

    def _tensor(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)


def _add_counts(counts: torch.Tensor, rows: torch.Tensor, token_ids: torch.Tensor) -> None:
    """counts[rows[j], token_ids[j]] += 1 for every j (repeats add up)."""
    ones = torch.ones(rows.shape[0], dtype=counts.dtype, device=counts.device)
    counts.index_put_((rows, token_ids.to(torch.int64)), ones, accumulate=True)
