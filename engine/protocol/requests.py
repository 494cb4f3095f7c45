"""Channel router -> instance inbox (prefill or mixed) and router -> every instance (aborts)."""

from __future__ import annotations

from dataclasses import dataclass

from engine.protocol.codec import message


@message(10)
@dataclass
class GenerateRequest:
    """A tokenized request. Tokens come back as `TokenBatch` messages to `reply_to`."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: dict  # SamplingParams.to_dict()
    reply_to: str  # the router's token inbox
    arrival_time: float  # wall clock (time.time()) at the router, for the TTFT split


@message(11)
@dataclass
class AbortRequest:
    """Stop a request wherever it is; unknown ids are counted and dropped."""

    request_id: str
    reason: str
