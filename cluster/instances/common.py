"""Pieces every instance actor composes: counters and token publishing."""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cluster.config import PdserveConfig
from cluster.instances.cache_reports import CacheReporter
from engine.block_manager import BlockManager
from engine.outputs import TokenDelta
from engine.procinfo import rss_mb
from engine.protocol.cache_events import PrefixCacheEvents
from engine.protocol.channels import ChannelError, SenderPool, node_ip_address
from engine.protocol.identity import InstanceId
from engine.protocol.tokens import Timings, TokenBatch, TokenItem

if TYPE_CHECKING:
    from cluster.instances.engine_loop import EngineLoop


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

    def __init__(self, source: InstanceId, senders: SenderPool, counters: Counters) -> None:
        self.source = source
        self._senders = senders
        self._counters = counters
        self.reporter: CacheReporter | None = None

    def report_cache(self, loop: EngineLoop, blocks: BlockManager) -> None:
        """Send the block manager's prefix-cache events to the routers this instance serves."""

        def send(address: str, report: PrefixCacheEvents) -> bool:
            try:
                self._senders.send(address, report)
                return True
            except ChannelError:
                self._counters.add("router_send_failures")
                return False

        self.reporter = loop.reporter = CacheReporter(self.source, blocks, send)

    def publish(self, items_by_router: dict[str, list[TokenItem]]) -> None:
        if self.reporter is not None:
            self.reporter.add_routers(items_by_router)
        for address, items in items_by_router.items():
            try:
                self._senders.send(address, TokenBatch(self.source, items))
            except ChannelError:
                self._counters.add("router_send_failures")

    @staticmethod
    def item(
        delta: TokenDelta,
        attempt: int,
        decode_instance: InstanceId | None = None,
        timings: Timings | None = None,
    ) -> TokenItem:
        return TokenItem(
            request_id=delta.request_id,
            first_index=delta.first_index,
            token_ids=list(delta.new_token_ids),
            finish_reason=delta.status.finish_reason(),
            error=delta.error,
            num_prompt_tokens=delta.num_prompt_tokens,
            num_cached_tokens=delta.num_cached_tokens,
            timings=timings,
            logprobs=delta.logprobs,
            decode_instance=decode_instance,
            attempt=attempt,
        )

    @staticmethod
    def error_item(
        request_id: str, attempt: int, index: int, error: str, overloaded: bool = False
    ) -> TokenItem:
        """An item ending the request; `overloaded` marks a capacity refusal worth retrying."""
        reason = "overloaded" if overloaded else "error"
        return TokenItem(request_id, index, [], reason, error, attempt=attempt)


def engine_stats(
    name: InstanceId, role: str, inbox: str, core, counters: Counters, tracked: int
) -> dict:
    """The stats every instance reports (call under the engine lock); each role adds its own."""
    scheduler = core.scheduler
    blocks = core.block_manager
    return {
        "name": str(name),
        "pid": os.getpid(),
        "rss_mb": rss_mb(),
        "inbox": inbox,
        "role": role,
        "running": len(scheduler.running),
        "waiting": len(scheduler.waiting),
        "requests": len(scheduler.requests),
        "num_blocks": blocks.num_blocks,
        "free_blocks": blocks.num_free_blocks,
        "tracked": tracked,
        "counters": counters.snapshot(),
    }


def deployment_id() -> str:
    """Same for this actor and its restarts, different for another deployment on the node (so
    one never unlinks the other's shared memory): the Ray job that created the actor."""
    try:
        import ray

        return ray.get_runtime_context().get_job_id()
    except Exception:  # not under Ray (tests that build the instance directly)
        return f"p{os.getpid()}"


def wall_time() -> float:
    return time.time()
