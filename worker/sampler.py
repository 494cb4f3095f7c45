"""Token sampling: penalties, greedy, temperature, top-k, top-p, with per-request reproducible
seeds; and the logprobs a request asks for.

Sampling is Gumbel-max in its exponential form: `argmax(p / E)` with `E ~ Exp(1)` draws from `p`.
The noise of a seeded request is counter-based: each of its draws is a hash of (its seed, the
number of tokens it has generated, the token id), computed for every seeded row in one batched
op (no generator, no kernel per row). So the token it draws depends only on its own logits, never
on its neighbours in the batch or on how many steps the runner has taken. Unseeded rows share the
runner's generator.
Presence/frequency penalties (OpenAI's definition) shift the logits of the rows that have them
before anything else, from counts kept on the device (worker/penalties.py); logprobs come from
the raw logits, as vLLM reports them by default. Nothing here reads device values back to the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.outputs import TokenLogprobs
from engine.sampling_params import SamplingParams
from worker.penalties import PenaltyCounts

_MASK64 = (1 << 64) - 1


@dataclass
class SamplingRow:
    params: SamplingParams
    num_generated: int
    # With penalties: the request's output so far when its counts must be (re)built (negative
    # ids are skipped); None to use the counts kept for `request_id`.
    output_token_ids: list[int] | None = None
    # Keys the penalty counts kept on the device; None: count `output_token_ids` alone.
    request_id: str | None = None


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


# splitmix64's constants as signed int64 (torch has no uint64 arithmetic; products wrap).
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)


def counter_exponential(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """Exp(1) noise `[S, V]` (fp32) from 64-bit keys `[S]`: entry (s, v) is a splitmix64 hash
    of (keys[s], v) turned into a uniform in (0, 1] (24 bits) and then into -log(u)."""
    cols = torch.arange(vocab, dtype=torch.int64, device=keys.device)  # [V]
    z = keys[:, None] + (cols[None, :] + 1) * _GOLDEN  # [S, V] int64, wrapping
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    z = z ^ _shr(z, 31)
    uniform = (_shr(z, 40) + 1).to(torch.float32) * 2.0**-24  # (0, 1]
    return -torch.log(uniform)


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


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
        self.penalty_counts = PenaltyCounts(device)

    def release(self, request_ids: list[str]) -> None:
        """Forget the penalty counts of released requests."""
        self.penalty_counts.release(request_ids)

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """logits `[N, V]` -> sampled token ids `[N]` (int64, on the logits' device).
        `logits` is not modified (the runner may still want logprobs from it)."""
        assert logits.shape[0] == len(rows)
        logits, counted = self._apply_penalties(logits, rows)  # [N, V]
        sampled = self._sample(logits, rows)  # [N]
        positions, slots = counted
        if slots:  # the draws join their requests' counts on the device
            self.penalty_counts.add_sampled(
                slots, sampled.index_select(0, self._tensor(positions, torch.int64))
            )
        return sampled

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
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

    def _apply_penalties(
        self, logits: torch.Tensor, rows: list[SamplingRow]
    ) -> tuple[torch.Tensor, tuple[list[int], list[int]]]:
        """OpenAI's penalties: logit -= frequency * count + presence * (count > 0), counted over
        the row's output so far. Returns the logits (`logits` itself when no row has a penalty)
        and, for rows whose counts are kept, their row indices and count slots."""
        penalized = [i for i, row in enumerate(rows) if row.params.has_penalties]
        if not penalized:
            return logits, ([], [])
        counts, kept, slots = self.penalty_counts.counts_for(
            [rows[i].request_id for i in penalized],
            [rows[i].output_token_ids for i in penalized],
            logits.shape[-1],
        )  # [P, V]
        freq = self._column([rows[i].params.frequency_penalty for i in penalized], torch.float32)
        pres = self._column([rows[i].params.presence_penalty for i in penalized], torch.float32)
        index = self._tensor(penalized, torch.int64)  # [P]
        shifted = logits.index_select(0, index).float() - freq * counts - pres * (counts > 0)
        penalized_logits = logits.float().index_copy(0, index, shifted)  # [N, V] fp32, new
        return penalized_logits, ([penalized[p] for p in kept], slots)

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
        if seeded:
            keys = [mix_seed(rows[i].params.seed or 0, rows[i].num_generated) for i in seeded]
            draws = counter_exponential(self._tensor(keys, torch.int64), shape[1])  # [S, V]
            noise.index_copy_(0, self._tensor(seeded, torch.int64), draws)
        # A zero draw would turn a filtered-out token (probability 0) into 0 / 0 = NaN, the argmax.
        return noise.clamp_min_(torch.finfo(noise.dtype).tiny)

    def _column(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        return self._tensor(values, dtype)[:, None]

    def _tensor(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)
