"""P's record of a request between admission and the end of its KV transfer."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.protocol.cache import TransferDone
from engine.protocol.identity import InstanceId
from engine.protocol.tokens import Timings


@dataclass
class TrackedRequest:
    """P's view of a request from admission to the end of its transfer."""

    reply_to: str  # the router's token inbox; "" once the client has its answer or is gone
    decode: InstanceId  # the decode instance that holds its reservation
    attempt: int  # the router's attempt (engine.protocol.requests)
    timings: Timings = field(default_factory=Timings)
    transfer_started: float = 0.0  # monotonic, when the first token was sampled
    cancel_sent: bool = False
    # Cancelled on purpose (finished on P, client gone): its transfer ending is no failure.
    cancelled_on_purpose: bool = False


def transfer_counter(done: TransferDone, tracked: TrackedRequest | None) -> str:
    """The counter a finished transfer moves, so that `transfers_failed` means a failure."""
    if done.ok:
        return "transfers_ok"
    if tracked is not None and tracked.cancelled_on_purpose:
        return "transfers_cancelled"
    return "transfers_failed"
