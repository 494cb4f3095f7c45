"""Channels prefill instance -> cache messager, messager -> prefill instance, messager -> decode.

P's prepare threads send `CacheTask`s; P's engine thread sends, in order, `StepPlan` (what the
step computes), one `LayerReady` per layer as the forward pass goes, and `PrefillDone` once the
first token is sampled. The messager answers P with `TransferDone` and tells D `KvComplete`
only after every write for the request has completed (or failed and drained).
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.protocol.identity import InstanceId


@dataclass
class CacheTask:
    request_id: str
    decode_instance: InstanceId
    decode_inbox: str
    src_block_ids: list[int]  # P's blocks, in sequence order
    dst_block_ids: list[int]  # D's blocks for the same positions
    num_prompt_tokens: int
    # Wall clock (P and its messager share a node). No write starts after it: D's lease on the
    # destination blocks runs out later than this, so a late write can never land in blocks D
    # has already given to another request.
    write_deadline: float
    skip_blocks: int = 0  # leading blocks D already holds (DecodeAllocation.cached_blocks)


@dataclass
class ChunkPlan:
    """One request's chunk in a step: KV of positions < end_pos exists after the step; the last
    chunk also completes the partly filled tail block."""

    request_id: str
    end_pos: int
    last: bool


@dataclass
class StepPlan:
    """The chunks of requests with a cache task that step `step_id` computes."""

    step_id: int
    chunks: list[ChunkPlan]


@dataclass
class LayerReady:
    step_id: int
    layer: int


@dataclass
class PrefillDone:
    request_id: str
    first_token_id: int


@dataclass
class CancelCache:
    """Stop sending this request; in-flight writes drain, then D and P hear of it."""

    request_id: str
    reason: str
    client_informed: bool = False  # the client has its answer or is gone: D must not report


@dataclass
class TransferDone:
    request_id: str
    ok: bool
    error: str = ""
    nbytes: int = 0
    seconds: float = 0.0


@dataclass
class KvComplete:
    """Sent to D after the last write completed: D may start decoding (or free, if not ok)."""

    request_id: str
    ok: bool
    first_token_id: int = -1
    error: str = ""
    # Wall-clock stamps on the messager, for the TTFT split: when it had the last layer's signal
    # and the first token (every write issued), and when it saw every write DONE.
    signalled_time: float = 0.0
    writes_done_time: float = 0.0
    client_informed: bool = False  # on failure: whether D should stay silent to the router
