"""The one table of wire type ids: every record that crosses a socket, and only those.

Ids group by channel (1-9 records nested in messages, 10s router -> instance, 20s P <-> D,
30s instance -> router: tokens and prefix-cache events, 40s P <-> messager <-> D). An id is never
reused for another meaning; changing a record's fields bumps `codec.PROTOCOL_VERSION`.
"""

from __future__ import annotations

from engine.protocol import codec
from engine.protocol.cache import (
    CacheTask,
    CancelCache,
    ChunkPlan,
    KvComplete,
    LayerReady,
    PrefillDone,
    StepPlan,
    TransferDone,
)
from engine.protocol.cache_events import PrefixCacheEvents
from engine.protocol.identity import InstanceId
from engine.protocol.requests import AbortRequest, GenerateRequest
from engine.protocol.splitwise import CancelDecode, DecodeAllocation, DecodeTask
from engine.protocol.tokens import Timings, TokenBatch, TokenItem
from engine.sampling_params import SamplingParams

TYPE_IDS: dict[type, int] = {
    InstanceId: 1,
    SamplingParams: 2,
    Timings: 3,
    ChunkPlan: 4,
    GenerateRequest: 10,
    AbortRequest: 11,
    DecodeTask: 20,
    DecodeAllocation: 21,
    CancelDecode: 22,
    TokenItem: 30,
    TokenBatch: 31,
    PrefixCacheEvents: 32,
    CacheTask: 40,
    StepPlan: 41,
    LayerReady: 42,
    PrefillDone: 43,
    CancelCache: 44,
    TransferDone: 45,
    KvComplete: 46,
}


def _register_all() -> None:
    ids = list(TYPE_IDS.values())
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise RuntimeError(f"wire type ids used twice: {duplicates}")
    for cls, type_id in TYPE_IDS.items():
        codec.register(cls, type_id)


_register_all()
