"""Every wire type round-trips; bad frames are rejected with ProtocolError, never crash."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest

from engine.config import Role
from engine.protocol import codec, registry
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
from engine.protocol.channels import Inbox, Sender
from engine.protocol.identity import InstanceId, MessagerId
from engine.protocol.requests import AbortRequest, GenerateRequest
from engine.protocol.splitwise import CancelDecode, DecodeAllocation, DecodeTask
from engine.protocol.tokens import Timings, TokenBatch, TokenItem
from engine.sampling_params import SamplingParams

P0 = InstanceId(Role.PREFILL, 0)
D1 = InstanceId(Role.DECODE, 1)
GREEDY = SamplingParams(temperature=0.0, max_tokens=3, stop=["\n"], seed=7, logprobs=2)

SAMPLES = [
    P0,
    GREEDY,
    Timings(arrival=1.0, kv_complete=2.5),
    ChunkPlan("r1", 16, False),
    GenerateRequest("r1", [1, 2, 3], GREEDY, "tcp://127.0.0.1:1", 1.5, attempt=2),
    AbortRequest("r1", "client gone"),
    TokenItem("r1", 0, [5], None, None, 3, 0, Timings(prefill_end=2.0), None, D1),
    TokenItem(
        "r1",
        1,
        [5, 9],
        "stop",
        None,
        3,
        0,
        None,
        [[-0.25, [[5, -0.25], [8, -1.5]]], [-3.0, [[2, -0.5], [9, -3.0]]]],
    ),
    TokenBatch(P0, [TokenItem("r1", 0, [5]), TokenItem("r2", 3, [6, 7])]),
    DecodeTask("r1", [1, 2], SamplingParams(), [2], "tcp://a:1", "tcp://b:2"),
    DecodeAllocation("r1", D1, True, [4, 5], "", 100),
    CancelDecode("r1", "timeout"),
    CacheTask("r1", D1, "tcp://d:1", [1, 2], [7, 8], 20, 1.0e9),
    StepPlan(3, [ChunkPlan("r1", 16, False), ChunkPlan("r2", 20, True)]),
    LayerReady(3, 11),
    PrefillDone("r1", 42),
    CancelCache("r1", "aborted", True),
    TransferDone("r1", True, "", 1024, 0.01),
    KvComplete("r1", True, 42, "", 1.0, 1.5, True),
    PrefixCacheEvents(D1, "a1", 3, 16, 100, 40, [b"\x00" * 32, b"\xff" * 32], [b"k" * 32], True),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg) -> None:
    back = codec.decode(codec.encode(msg))
    assert type(back) is type(msg)
    assert back == msg
    assert dataclasses.asdict(back) == dataclasses.asdict(msg)


def test_every_registered_type_is_sampled() -> None:
    assert {type(m) for m in SAMPLES} == set(codec.registered_types().values())
    assert set(registry.TYPE_IDS) == set(codec.registered_types().values())


def test_type_ids_are_unique() -> None:
    ids = list(registry.TYPE_IDS.values())
    assert len(ids) == len(set(ids))


def test_nested_records_keep_their_types() -> None:
    back = codec.decode(codec.encode(SAMPLES[4]))  # GenerateRequest
    assert isinstance(back.sampling, SamplingParams)
    item = codec.decode(codec.encode(SAMPLES[6]))
    assert isinstance(item.timings, Timings) and item.timings.prefill_end == 2.0
    assert item.decode_instance == D1 and item.decode_instance.role is Role.DECODE


def test_identities_name_ray_actors() -> None:
    assert str(P0) == "prefill-0" and str(D1) == "decode-1"
    assert str(MessagerId(3)) == "messager-3" and MessagerId(3).prefill == InstanceId(
        Role.PREFILL, 3
    )


def test_timings_update_takes_only_stamps_present() -> None:
    stamps = Timings(arrival=1.0, prepared=2.0)
    stamps.update(Timings(prepared=3.0, kv_complete=4.0))
    assert stamps == Timings(arrival=1.0, prepared=3.0, kv_complete=4.0)


def _frame(type_id: int, *fields) -> bytes:
    return msgpack.packb([codec.PROTOCOL_VERSION, type_id, *fields], use_bin_type=True)


def _nested(msg) -> msgpack.ExtType:
    return msgpack.ExtType(1, codec.encode(msg))


STEP_PLAN = registry.TYPE_IDS[StepPlan]
ABORT = registry.TYPE_IDS[AbortRequest]
GENERATE = registry.TYPE_IDS[GenerateRequest]
BATCH = registry.TYPE_IDS[TokenBatch]
INSTANCE = registry.TYPE_IDS[InstanceId]


@pytest.mark.parametrize(
    "frame",
    [
        b"\xc1garbage",
        msgpack.packb([codec.PROTOCOL_VERSION - 1, ABORT, "r1", "x"]),  # an older version
        msgpack.packb([codec.PROTOCOL_VERSION, 9999, "r1"]),
        msgpack.packb([codec.PROTOCOL_VERSION, ABORT, "r1"]),  # a field missing
        msgpack.packb([codec.PROTOCOL_VERSION, ABORT, 5, "x"]),  # wrong type
        msgpack.packb({"not": "a list"}),
        _frame(STEP_PLAN, 3, [["r1", 16, False]]),  # a chunk that is a bare list, not a record
        _frame(STEP_PLAN, 3, [_nested(LayerReady(3, 1))]),  # a record of the wrong type
        _frame(GENERATE, "r1", [1, 2], {"temperature": 0.0}, "tcp://a:1", 1.0, 0),  # a dict
        _frame(GENERATE, "r1", [1, "x"], _nested(GREEDY), "tcp://a:1", 1.0, 0),  # a token str
        _frame(BATCH, _nested(P0), [_nested(P0)]),  # items that are not TokenItems
        _frame(INSTANCE, "router", 0),  # not a Role
        msgpack.packb([codec.PROTOCOL_VERSION, ABORT, msgpack.ExtType(9, b"x"), "x"]),
    ],
)
def test_bad_frames_raise_protocol_error(frame: bytes) -> None:
    with pytest.raises(codec.ProtocolError):
        codec.decode(frame)


def test_invalid_sampling_params_are_a_protocol_error() -> None:
    values = [getattr(GREEDY, f.name) for f in dataclasses.fields(SamplingParams)]
    values[0] = -1.0  # temperature out of range: the record's own validation refuses it
    bad = _frame(registry.TYPE_IDS[SamplingParams], *values)
    frame = _frame(GENERATE, "r1", [1], msgpack.ExtType(1, bad), "tcp://a:1", 1.0, 0)
    with pytest.raises(codec.ProtocolError, match="temperature"):
        codec.decode(frame)


def test_channel_accepts_only_its_types_and_counts_bad_frames() -> None:
    inbox = Inbox("127.0.0.1", accept=(AbortRequest,))
    sender = Sender(inbox.address)
    try:
        sender.send(CancelDecode("r1", "wrong channel"))
        sender._socket.send(b"\x00\x01garbage")
        sender.send(AbortRequest("r2", "ok"))
        msg = inbox.recv(timeout_s=5)
        assert msg == AbortRequest("r2", "ok")
        assert inbox.bad_frames == 2
        assert inbox.recv(timeout_s=0.05) is None
    finally:
        sender.close()
        inbox.close()
