"""Channel prefill/decode/mixed instance -> router: generated tokens, one message per step."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.protocol.codec import message


@message(30)
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
    # Server-side timings (wall clock seconds) that only the instance knows.
    timings: dict = field(default_factory=dict)
    # When the request asked for logprobs: per token [logprob, [[token_id, logprob], ...]]
    # (engine.outputs.TokenLogprobs), aligned with token_ids; else None.
    logprobs: list | None = None
    # Set by P on a request's first token: the decode instance that will continue it, so the
    # router can fail the request at once if that instance dies before its first token.
    decode_instance: str = ""


@message(31)
@dataclass
class TokenBatch:
    source: str  # instance name
    items: list[TokenItem]
