"""Channel router -> instance inbox (prefill or mixed) and router -> instances (aborts).

Every attempt at a request is a request of its own on the wire: when the router sends one again
(its instance died before the first token), the new attempt gets a new id, made by the router
from the request's first id and `attempt` (never parsed back), so an instance never holds two
attempts under one id and late messages of an earlier attempt meet no one.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.protocol.identity import InstanceId
from engine.sampling_params import SamplingParams


@dataclass
class GenerateRequest:
    """A tokenized request. Tokens come back as `TokenBatch` messages to `reply_to`."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    reply_to: str  # the router's token inbox
    arrival_time: float  # wall clock (time.time()) at the router, for the TTFT split
    attempt: int = 0  # 0 for the first send, +1 for each resend (for logs and metrics)
    # Cache-aware routing (router.routing): the decode instance P should try first, since it
    # holds the most of this prompt's prefix (None: P's own choice), and whether the decode
    # instance may reuse the prefix it holds instead of receiving that KV again.
    decode_hint: InstanceId | None = None
    reuse_decode_prefix: bool = False


@dataclass
class AbortRequest:
    """Stop a request wherever it is; unknown ids are counted and dropped."""

    request_id: str
    reason: str
