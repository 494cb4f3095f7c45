"""Pieces every instance actor composes: counters and token publishing."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

from cluster.config import PdserveConfig
from engine.outputs import TokenDelta
from engine.protocol.channels import ChannelError, SenderPool, node_ip_address
from engine.protocol.tokens import TokenBatch, TokenItem


def advertised_host(config: PdserveConfig) -> str:
    """Address this actor binds and advertises: the configured one for an embedded local Ray
    (loopback by default, so nothing leaves the machine), the node's own address in a cluster."""
    if config.cluster.address is None:
        return config.cluster.node_ip
    return node_ip_address()


@dataclass
class Counters:
    """Monotonic counters an instance reports through stats()."""

    values: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, key: str, amount: int = 1) -> None:
        with self.lock:
            self.values[key] += amount

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return dict(self.values)


class TokenPublisher:
    """Sends one TokenBatch per router per step (never one message per token).

    Only the engine thread calls `publish`; it owns the sender sockets.
    """

    def __init__(self, source: str, senders: SenderPool, counters: Counters) -> None:
        self.source = source
        self._senders = senders
        self._counters = counters

    def publish(self, items_by_router: dict[str, list[TokenItem]]) -> None:
        for address, items in items_by_router.items():
            try:
                self._senders.send(address, TokenBatch(self.source, items))
            except ChannelError:
                self._counters.add("router_send_failures")

    @staticmethod
    def item(delta: TokenDelta, decode_instance: str = "", **timings: float) -> TokenItem:
        return TokenItem(
            request_id=delta.request_id,
            first_index=delta.first_index,
            token_ids=list(delta.new_token_ids),
            finish_reason=delta.status.finish_reason(),
            error=delta.error,
            num_prompt_tokens=delta.num_prompt_tokens,
            num_cached_tokens=delta.num_cached_tokens,
            timings=dict(timings),
            logprobs=delta.logprobs,
            decode_instance=decode_instance,
        )

    @staticmethod
    def error_item(request_id: str, index: int, error: str, overloaded: bool = False) -> TokenItem:
        """An item ending the request; `overloaded` marks a capacity refusal worth retrying."""
        reason = "overloaded" if overloaded else "error"
        return TokenItem(request_id, index, [], finish_reason=reason, error=error)


def wall_time() -> float:
    return time.time()
