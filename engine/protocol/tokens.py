"""Channel prefill/decode/mixed instance -> router: generated tokens, one message per step."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from engine.protocol.identity import InstanceId

if TYPE_CHECKING:
    from engine.outputs import TokenDelta


@dataclass
class Timings:
    """Server-side wall-clock stamps (time.time()) of one request, for the router's TTFT split;
    each is set by the component that saw the moment, None until then."""

    arrival: float | None = None  # the router sent it (GenerateRequest.arrival_time)
    prepared: float | None = None  # P: blocks reserved and D's allocation in hand
    prefill_start: float | None = None  # P: its first chunk was scheduled
    prefill_end: float | None = None  # P: the first token was sampled
    kv_signalled: float | None = None  # messager: last layer's signal and the first token in
    writes_done: float | None = None  # messager: every write polled DONE
    kv_complete: float | None = None  # D: took KvComplete
    first_decode_step: float | None = None  # D: its first decode step ended

    def update(self, other: Timings) -> None:
        """Take every stamp `other` has."""
        for f in fields(self):
            value = getattr(other, f.name)
            if value is not None:
                setattr(self, f.name, value)


@dataclass
class TokenItem:
    """New tokens of one request. `first_index` is the index of token_ids[0] in the output, so the
    router can order tokens that reach it from P (the first) and D (the rest)."""

    request_id: str
    first_index: int
    token_ids: list[int]
    finish_reason: str | None = None  # stop | length | abort | error | overloaded
    error: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    timings: Timings | None = None  # stamps only the instance knows (None: nothing new)
    # When the request asked for logprobs: per token [logprob, [[token_id, logprob], ...]]
    # (engine.outputs.TokenLogprobs), aligned with token_ids; else None.
    logprobs: list[list | None] | None = None
    # Set by P on a request's first token: the decode instance that will continue it, so the
    # router can fail the request at once if that instance dies before its first token.
    decode_instance: InstanceId | None = None

    @classmethod
    def from_delta(
        cls, delta: TokenDelta, timings: Timings | None, decode: InstanceId | None
    ) -> TokenItem:
        """The item that carries one step's delta of a request to its router."""
        return cls(
            request_id=delta.request_id,
            first_index=delta.first_index,
            token_ids=list(delta.new_token_ids),
            finish_reason=delta.status.finish_reason(),
            error=delta.error,
            num_prompt_tokens=delta.num_prompt_tokens,
            num_cached_tokens=delta.num_cached_tokens,
            timings=timings,
            logprobs=delta.logprobs,
            decode_instance=decode,
        )

    @classmethod
    def failed(cls, request_id: str, index: int, error: str, overloaded: bool = False) -> TokenItem:
        """An item ending the request; `overloaded` marks a capacity refusal worth retrying."""
        return cls(request_id, index, [], "overloaded" if overloaded else "error", error)


@dataclass
class TokenBatch:
    source: InstanceId
    items: list[TokenItem]
