"""Every wire message round-trips; bad frames are rejected with ProtocolError, never crash."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest

from cache_transfer import messages as cache_msgs
from engine.protocol import cache_events, codec, requests, splitwise, tokens
from engine.protocol.channels import Inbox, Sender

SAMPLES = [
    requests.GenerateRequest("r1", [1, 2, 3], {"temperature": 0.0}, "tcp://127.0.0.1:1", 1.5),
    requests.AbortRequest("r1", "client gone"),
    tokens.TokenItem("r1", 0, [5], None, None, 3, 0, {"prefill_end": 2.0}),
    tokens.TokenItem(
        "r1",
        1,
        [5, 9],
        "stop",
        None,
        3,
        0,
        {},
        [[-0.25, [[5, -0.25], [8, -1.5]]], [-3.0, [[2, -0.5], [9, -3.0]]]],
    ),
    tokens.TokenBatch("p0", [tokens.TokenItem("r1", 0, [5]), tokens.TokenItem("r2", 3, [6, 7])]),
    splitwise.DecodeTask("r1", [1, 2], {"max_tokens": 3}, [2], "tcp://a:1", "tcp://b:2", "p0"),
    splitwise.DecodeAllocation("r1", "d0", True, [4, 5], "", 100),
    splitwise.CancelDecode("r1", "timeout"),
    cache_msgs.CacheTask("r1", "d0", "tcp://d:1", [1, 2], [7, 8], 20, 1.0e9),
    cache_msgs.StepPlan(3, [["r1", 16, False], ["r2", 20, True]]),
    cache_msgs.LayerReady(3, 11),
    cache_msgs.PrefillDone("r1", 42),
    cache_msgs.CancelCache("r1", "aborted"),
    cache_msgs.TransferDone("r1", True, "", 1024, 0.01),
    cache_msgs.KvComplete("r1", True, 42, "", 1.0, 1.5),
    cache_events.PrefixCacheEvents(
        "d0", "a1", 3, 16, 100, 40, [b"\x00" * 32, b"\xff" * 32], [b"k" * 32], True
    ),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg) -> None:
    back = codec.decode(codec.encode(msg))
    assert type(back) is type(msg)
    assert dataclasses.asdict(back) == dataclasses.asdict(msg)


def test_registered_types_all_sampled() -> None:
    assert {type(m) for m in SAMPLES} == set(codec._BY_ID.values())


@pytest.mark.parametrize(
    "frame",
    [
        b"\xc1garbage",
        msgpack.packb([codec.PROTOCOL_VERSION + 1, 11, "r1", "x"]),
        msgpack.packb([codec.PROTOCOL_VERSION, 9999, "r1"]),
        msgpack.packb([codec.PROTOCOL_VERSION, 11, "r1"]),  # a field missing
        msgpack.packb([codec.PROTOCOL_VERSION, 11, 5, "x"]),  # wrong type
        msgpack.packb({"not": "a list"}),
    ],
)
def test_bad_frames_raise_protocol_error(frame: bytes) -> None:
    with pytest.raises(codec.ProtocolError):
        codec.decode(frame)


def test_channel_accepts_only_its_types_and_counts_bad_frames() -> None:
    inbox = Inbox("127.0.0.1", accept=(requests.AbortRequest,))
    sender = Sender(inbox.address)
    try:
        sender.send(splitwise.CancelDecode("r1", "wrong channel"))
        sender._socket.send(b"\x00\x01garbage")
        sender.send(requests.AbortRequest("r2", "ok"))
        msg = inbox.recv(timeout_s=5)
        assert msg == requests.AbortRequest("r2", "ok")
        assert inbox.bad_frames == 2
        assert inbox.recv(timeout_s=0.05) is None
    finally:
        sender.close()
        inbox.close()
