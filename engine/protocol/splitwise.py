"""Channel prefill instance <-> decode instance: the splitwise task and D's allocation."""

from __future__ import annotations

from dataclasses import dataclass

from engine.protocol.identity import InstanceId
from engine.sampling_params import SamplingParams


@dataclass
class DecodeTask:
    """P asks D to reserve blocks for a request whose KV P will write."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    eos_token_ids: list[int]
    reply_to: str  # P's inbox for the DecodeAllocation
    router_inbox: str  # where D streams tokens
    reuse_prefix: bool = False  # D may use cached blocks holding a prefix of the prompt


@dataclass
class DecodeAllocation:
    """D's answer. On acceptance the blocks are held under a lease until KV completes."""

    request_id: str
    decode_instance: InstanceId
    accepted: bool
    block_ids: list[int]
    reason: str = ""
    free_blocks: int = 0  # D's load after this decision, for P's choice of D
    # The leading `block_ids` that already hold this prompt's KV on D (reused from its prefix
    # cache): P writes only the blocks after them.
    cached_blocks: int = 0


@dataclass
class CancelDecode:
    """P gives up a reservation (timed out, aborted, finished on P). D frees the blocks."""

    request_id: str
    reason: str
