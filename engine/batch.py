"""Plain data passed between the scheduler (engine/, no torch) and the model runner (worker/).

The scheduler says what to compute this step; the runner answers with sampled tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.outputs import TokenLogprobs
from engine.sampling_params import SamplingParams

# A token id the scheduler does not know yet: the one this request sampled in the previous step,
# still on the device. The runner substitutes it from that step's sampled ids (overlap schedule).
PLACEHOLDER_TOKEN = -1


@dataclass
class ScheduledChunk:
    """Tokens of one request to compute this step.

    `token_ids` sit at positions start_pos .. start_pos + len(token_ids) - 1. Their KV is written
    into the slots given by `block_ids` (the request's whole block table: position p lives in
    block block_ids[p // block_size] at offset p % block_size), and attention reads positions
    0 .. start_pos + len(token_ids) - 1 from the same table. `block_ids` is the request's own
    list, not a copy (a copy per step would cost as much as the context is long): the runner
    reads it while it prepares the step and keeps no reference; blocks only ever get appended
    to it, and a request whose blocks were replaced (preempted) is in `released_request_ids`.
    A decode step is a chunk of one token. When `sample` is set, the chunk ends at the current end
    of the sequence and the runner samples the next token from its last position.
    Under the overlap schedule a decode chunk's token may be PLACEHOLDER_TOKEN (see above).
    """

    request_id: str
    token_ids: list[int]
    start_pos: int
    block_ids: list[int]
    sample: bool
    sampling_params: SamplingParams
    # Number of tokens this request has generated so far: seeds per-request RNG streams so a seeded
    # request draws the same randomness whatever batch it is in.
    num_generated: int = 0
    # The request's output so far, for presence/frequency penalties: filled only in the first
    # sampling chunk of a request with a penalty after it was (re)admitted. The runner keeps
    # the counts on the device from then on and adds every token it samples (a copy of the
    # output per step would cost as much as the output is long).
    output_token_ids: list[int] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def end_pos(self) -> int:
        return self.start_pos + len(self.token_ids)

    @property
    def is_decode(self) -> bool:
        return self.sample and len(self.token_ids) == 1 and self.start_pos > 0


@dataclass
class SchedulerOutput:
    """What to run in one step. Decode chunks come first, then prefill chunks."""

    step_id: int
    chunks: list[ScheduledChunk] = field(default_factory=list)
    # Requests whose blocks were released this step (finished, aborted, preempted); runners that
    # keep per-request state (RNG streams, CUDA-graph slots) drop it.
    released_request_ids: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


@dataclass
class ModelRunnerOutput:
    """Sampled token per scheduled chunk, in chunk order; None where the chunk did not sample.

    `logprobs` is None when no chunk of the step asked for logprobs; otherwise one entry per
    chunk, None where the chunk did not sample or did not ask.
    """

    step_id: int
    request_ids: list[str]
    sampled_token_ids: list[int | None]
    logprobs: list[TokenLogprobs | None] | None = None
