"""The transfer backends' shared vocabulary: handles, states, errors, deadlines, endpoint dicts
(cache_transfer/backend.py has the contract and re-exports all of these)."""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cache_transfer.layout import LayoutError
from cache_transfer.tp_layout import RankKV, check_ranks

ENDPOINT_VERSION = 2  # 2: "ranks" (one RankKV each) replaced "regions"


class TransferState(enum.IntEnum):
    """Ordered: ``state >= TransferState.DONE`` means finished, successfully or not."""

    PENDING = 0
    DONE = 1
    FAILED = 2


class TransferError(Exception):
    """A transfer, connection or registration failed at the backend boundary."""


class TransferTimeout(TransferError):
    """A wait reached its deadline before the awaited event."""


_handle_ids = itertools.count(1)


@dataclass(eq=False)
class TransferHandle:
    """One write, as returned by ``write``. Backend-private state lives in ``_impl``."""

    peer: str
    nbytes: int
    num_descs: int
    state: TransferState = TransferState.PENDING
    error: str = ""
    id: int = field(default_factory=lambda: next(_handle_ids))
    released: bool = False
    _impl: Any = field(default=None, repr=False)


def deadline_in(seconds: float) -> float:
    """Absolute deadline ``seconds`` from now, in the clock every wait uses."""
    return time.monotonic() + seconds


def remaining(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


# Used only by backends that cannot block on a completion (NIXL offers no blocking wait):
# the sleep starts tiny so a nearly finished transfer costs little latency, and is capped so an
# idle waiter costs little CPU.
_MIN_POLL_SLEEP_S = 50e-6
_MAX_POLL_SLEEP_S = 1e-3


def poll_until(
    poll: Callable[[TransferHandle], TransferState], handle: TransferHandle, deadline: float
) -> TransferState:
    """Poll `handle` with a short, growing, capped sleep until DONE or FAILED; TransferTimeout
    at `deadline`."""
    sleep_s = _MIN_POLL_SLEEP_S
    while True:
        state = poll(handle)
        if state >= TransferState.DONE:
            return state
        left = remaining(deadline)
        if left <= 0:
            raise TransferTimeout(f"transfer {handle.id} to {handle.peer} still pending")
        time.sleep(min(sleep_s, left))
        sleep_s = min(sleep_s * 2, _MAX_POLL_SLEEP_S)


def endpoint_field(info: dict[str, Any], key: str) -> Any:
    """A field of a peer's endpoint dict, or TransferError naming it."""
    try:
        return info[key]
    except KeyError:
        raise TransferError(f"endpoint info lacks {key!r}") from None


def parse_endpoint_info(info: Any, backend: str) -> tuple[str, list[RankKV]]:
    """Peer name and ranks from an endpoint dict of this backend and protocol version."""
    if not isinstance(info, dict):
        raise TransferError(f"endpoint info must be a dict, got {type(info).__name__}")
    if info.get("version") != ENDPOINT_VERSION:
        raise TransferError(
            f"endpoint version {info.get('version')!r}, expected {ENDPOINT_VERSION}"
        )
    if info.get("backend") != backend:
        raise TransferError(f"endpoint is for backend {info.get('backend')!r}, not {backend!r}")
    wire = endpoint_field(info, "ranks")
    try:
        if not isinstance(wire, list):
            raise LayoutError(f"ranks must be a list, got {type(wire).__name__}")
        ranks = [RankKV.from_wire(rank) for rank in wire]
        check_ranks(ranks)
    except LayoutError as exc:
        raise TransferError(f"bad ranks in endpoint info: {exc}") from exc
    return str(endpoint_field(info, "agent")), ranks
