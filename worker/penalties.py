"""Presence/frequency penalty counts kept on the device, one row per request.

Building each penalized request's token counts from its whole output every step costs as much
as the output is long (a copy on the host and a scatter of every token). Instead each request
with a penalty owns a row of `[rows, vocab]` counts on the device: it is built once from the
output the scheduler sends (the first sampling chunk after the request was admitted or
readmitted), and every token the sampler draws for it is added on the device right after the
draw, so a token still in flight (overlap schedule) is already counted. A request's row is
dropped when the scheduler releases it. A row without a request id (tests, callers that keep no
state) is counted from its `output_token_ids` alone, as before.
"""

from __future__ import annotations

import torch


class PenaltyCounts:
    def __init__(self, device: torch.device, rows: int = 8) -> None:
        self.device = device
        self._initial_rows = rows
        self.counts: torch.Tensor | None = None  # [rows, V] fp32, made on first use
        self._slot_of: dict[str, int] = {}
        self._free: list[int] = []

    @property
    def num_requests(self) -> int:
        return len(self._slot_of)

    def release(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            slot = self._slot_of.pop(request_id, None)
            if slot is not None:
                self._free.append(slot)

    def counts_for(
        self,
        request_ids: list[str | None],
        outputs: list[list[int] | None],
        vocab: int,
    ) -> tuple[torch.Tensor, list[int], list[int]]:
        """Counts `[P, V]` of P penalized rows, given each one's request id (None: no state)
        and, where the row must be (re)built, its output so far. Also returns, for the rows
        with an id, their positions among the P and their slots (for `add_sampled`)."""
        self._ensure(vocab)
        assert self.counts is not None
        slots: list[int] = []
        kept: list[int] = []
        temporary: list[int] = []
        rebuild: list[int] = []
        token_slots: list[int] = []
        tokens: list[int] = []
        for p, (request_id, output) in enumerate(zip(request_ids, outputs, strict=True)):
            slot = None if request_id is None else self._slot_of.get(request_id)
            if slot is None or output is not None:
                if slot is None:
                    slot = self._take()
                    if request_id is None:
                        temporary.append(slot)
                    else:
                        self._slot_of[request_id] = slot
                rebuild.append(slot)
                known = [t for t in output or () if 0 <= t < vocab]  # placeholders: nothing
                token_slots += [slot] * len(known)
                tokens += known
            if request_id is not None:
                kept.append(p)
            slots.append(slot)
        if rebuild:
            self.counts.index_fill_(0, _tensor(rebuild, self.device), 0.0)
        if tokens:
            add_counts(self.counts, _tensor(token_slots, self.device), _tensor(tokens, self.device))
        counts = self.counts.index_select(0, _tensor(slots, self.device))  # [P, V]
        self._free += temporary
        return counts, kept, [slots[p] for p in kept]

    def add_sampled(self, slots: list[int], tokens: torch.Tensor) -> None:
        """Count each slot's newly sampled token (`tokens` `[len(slots)]`, on the device)."""
        if slots:
            assert self.counts is not None
            add_counts(self.counts, _tensor(slots, self.device), tokens)

    def _take(self) -> int:
        if not self._free:
            self._grow()
        return self._free.pop()

    def _ensure(self, vocab: int) -> None:
        if self.counts is None or self.counts.shape[1] != vocab:
            self.counts = torch.zeros(self._initial_rows, vocab, device=self.device)
            self._slot_of.clear()
            self._free = list(range(self._initial_rows - 1, -1, -1))

    def _grow(self) -> None:
        assert self.counts is not None
        old, vocab = self.counts.shape
        bigger = torch.zeros(2 * old, vocab, device=self.device)
        bigger[:old].copy_(self.counts)
        self.counts = bigger
        self._free = list(range(2 * old - 1, old - 1, -1))


def add_counts(counts: torch.Tensor, rows: torch.Tensor, token_ids: torch.Tensor) -> None:
    """counts[rows[j], token_ids[j]] += 1 for every j (repeats add up)."""
    ones = torch.ones(rows.shape[0], dtype=counts.dtype, device=counts.device)
    counts.index_put_((rows, token_ids.to(torch.int64)), ones, accumulate=True)


def _tensor(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64).to(device, non_blocking=True)
