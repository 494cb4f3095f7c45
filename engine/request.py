"""The one Request type, with an ordered status enum that already knows the PD states."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from engine.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    """Ordered lifecycle. Everything >= FINISHED_STOPPED is terminal, so "finished" is one compare.

    Mixed role:   WAITING -> RUNNING -> FINISHED_*  (back to WAITING when preempted)
    Prefill role: WAITING_FOR_ALLOCATION -> WAITING -> RUNNING -> SENDING_KV -> FINISHED_*
    Decode role:  WAITING_FOR_KV -> RUNNING -> FINISHED_*
    """

    WAITING_FOR_ALLOCATION = 0  # P: preparing, waiting for D to allocate blocks
    WAITING = 1  # queued for computation, or preempted and queued for recomputation
    WAITING_FOR_KV = 2  # D: blocks allocated, KV is being written by P
    RUNNING = 3  # prefilling (chunked) or decoding
    SENDING_KV = 4  # P: first token sampled, blocks held until the transfer completes
    FINISHED_STOPPED = 5  # EOS, stop token or stop string
    FINISHED_LENGTH = 6  # max_tokens or context length reached
    FINISHED_ABORTED = 7  # client gone or cancelled
    FINISHED_ERROR = 8  # deadline passed, peer died, transfer failed

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclass
class Request:
    """A sequence being served: prompt, generated tokens and how far the KV cache has got."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    # Tokens whose KV is in the cache (prefix-cache hits included).
    num_computed_tokens: int = 0
    # Of those, how many came from the prefix cache on the last allocation.
    num_cached_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    # Sampling chunks scheduled whose token has not been appended yet: 1 while the overlap
    # schedule runs step N before step N-1's token is read back, else 0.
    pending_samples: int = 0
    # Penalties: whether the runner has this request's output (it keeps token counts on the
    # device from then on); cleared when the request is released by preemption.
    output_counted: bool = False
    error: str | None = None
    # Prefix-cache keys of its first full blocks, each computed once (engine/prefix_keys.py).
    block_keys: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError(f"request {self.request_id}: empty prompt")

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens at positions start .. end - 1 (known ones only), without building the whole
        sequence: a decode step reads one token of the output, whatever the context length."""
        num_prompt = len(self.prompt_token_ids)
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt : end - num_prompt]
        head = self.prompt_token_ids[start:end]
        if end > num_prompt:
            head += self.output_token_ids[: end - num_prompt]
        return head

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def finished(self) -> bool:
        return self.status.finished

    @property
    def num_tokens_with_pending(self) -> int:
        """Tokens including the ones sampled on the device but not read back yet."""
        return self.num_tokens + self.pending_samples

    def may_sample_more(self, max_model_len: int) -> bool:
        """False when the tokens already in flight reach max_tokens or the context: scheduling
        another step would only compute a token that is thrown away."""
        produced = self.num_output_tokens + self.pending_samples
        return (
            produced < self.sampling_params.max_tokens
            and self.num_tokens_with_pending < max_model_len
        )

    def check_stop(self, max_model_len: int) -> RequestStatus | None:
        """The finishing status implied by the newest token, if any (stop strings are the
        detokenizer's job: they need text)."""
        last = self.output_token_ids[-1]
        params = self.sampling_params
        if not params.ignore_eos and last in self.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if last in params.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if self.num_output_tokens >= params.max_tokens or self.num_tokens >= max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
