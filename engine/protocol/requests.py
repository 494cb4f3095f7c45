"""Channel router -> instance inbox (prefill or mixed) and router -> instances (aborts).

A request keeps its id for its whole life. When the instance that held it dies before its first
token, the router sends it again to another instance with `attempt + 1`; every message about a
request carries the attempt it belongs to, so a late message of an earlier attempt is told apart
from the current one (and dropped) without renaming the request.
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
    attempt: int = 0  # 0, then +1 for each resend after the instance holding it died
    # Cache-aware routing (router.routing): the decode instance P should try first, since it
    # holds the most of this prompt's prefix (None: P's own choice), and whether the decode
    # instance may reuse the prefix it holds instead of receiving that KV again.
    decode_hint: InstanceId | None = None
    reuse_decode_prefix: bool = False


@dataclass
class AbortRequest:
    """Stop a request wherever it is, if what is held belongs to `attempt` or an earlier one (a
    newer attempt of the same id is left alone). Unknown ids are counted and dropped."""

    request_id: str
    reason: str
    attempt: int = 0

    def covers(self, held_attempt: int) -> bool:
        return held_attempt <= self.attempt
