"""Decode instance: accepts splitwise tasks, receives KV into its registered cache, decodes.

Threads: the control thread reads the inbox (DecodeTask, CancelDecode, KvComplete, AbortRequest)
and answers allocations at once, so a busy forward pass never delays P's preparation; the engine
thread runs decode steps and publishes one TokenBatch per router per step.

Block safety: blocks of a request whose KV may still be in flight are freed only on KvComplete
(the messager sends it after every write finished or failed) or when the lease expires.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

from cache_transfer.factory import kv_agent_name, make_backend, regions_of_tensors
from cluster.config import PdserveConfig
from cluster.instances.common import (
    Counters,
    TokenPublisher,
    advertised_host,
    engine_stats,
    wall_time,
)
from cluster.instances.engine_loop import EngineLoop
from engine.batch import SchedulerOutput
from engine.config import Role
from engine.outputs import TokenDelta
from engine.protocol.cache import KvComplete
from engine.protocol.channels import ChannelError, Inbox, SenderPool
from engine.protocol.identity import InstanceId
from engine.protocol.requests import AbortRequest
from engine.protocol.splitwise import CancelDecode, DecodeAllocation, DecodeTask
from engine.protocol.tokens import Timings, TokenItem
from engine.request import Request, RequestStatus
from worker.engine_core import EngineCore, resolve_overlap


@dataclass
class _Remote:
    """What D remembers of a request besides the scheduler's Request."""

    router_inbox: str
    attempt: int  # the router's attempt (engine.protocol.requests) this allocation serves
    reserved_at: float  # monotonic, starts the KV lease
    aborted: bool = False  # client gone while KV may still be in flight
    # Wall-clock stamps of the transfer, for the router's TTFT split.
    transfer_stamps: Timings = field(default_factory=Timings)


class DecodeInstance:
    role = Role.DECODE

    def __init__(self, name: InstanceId, config: dict) -> None:
        self.name = name
        self.config = PdserveConfig.model_validate(config)
        self.counters = Counters()
        self._remote: dict[str, _Remote] = {}
        self._stop = threading.Event()

    def setup(self) -> dict:
        self.host = advertised_host(self.config)
        cfg = self.config
        overlap = resolve_overlap(cfg.decode.overlap_schedule, cfg.model)
        self.core = EngineCore(cfg.model, cfg.decode.engine, Role.DECODE, overlap=overlap)
        self.backend = make_backend(cfg.transfer.backend, kv_agent_name(self.name), self.host)
        self.backend.register(regions_of_tensors(self.core.runner.kv_cache.layers))
        self.senders = SenderPool()
        self.publisher = TokenPublisher(self.name, self.senders, self.counters)
        self.loop = EngineLoop(
            self.core,
            self._after_step,
            tick=self._expire_leases,
            on_failure=self._on_failure,
            name=f"{self.name}-engine",
        )
        self.publisher.report_cache(self.loop, self.core.block_manager)
        accept = (DecodeTask, CancelDecode, KvComplete, AbortRequest)
        self.inbox = Inbox(self.host, accept=accept, name=str(self.name))
        self._receiver = threading.Thread(target=self._receive, daemon=True)
        self.loop.start()
        self._receiver.start()
        return {
            "name": self.name,
            "role": self.role.value,
            "inbox": self.inbox.address,
            "max_model_len": self.core.max_model_len,
            "transfer": self.backend.endpoint_info(),
            "num_blocks": self.core.block_manager.num_blocks,
        }

    # ------------------------------------------------------------------ control thread
    def _receive(self) -> None:
        handlers = {
            DecodeTask: self._on_task,
            CancelDecode: self._on_cancel,
            KvComplete: self._on_kv_complete,
            AbortRequest: self._on_abort,
        }
        while not self._stop.is_set():
            msg = self.inbox.recv(timeout_s=0.5)
            if msg is not None:
                handlers[type(msg)](msg)

    def _on_task(self, task: DecodeTask) -> None:
        request = Request(
            task.request_id,
            task.prompt_token_ids,
            task.sampling,
            eos_token_ids=tuple(task.eos_token_ids),
        )
        with self.loop.lock:
            accepted = request.request_id not in self._remote and (
                self.core.scheduler.reserve_remote(request, reuse_prefix=task.reuse_prefix)
            )
            if accepted:
                remote = _Remote(task.router_inbox, task.attempt, time.monotonic())
                self._remote[request.request_id] = remote
            free = self.core.block_manager.num_free_blocks
        reply = DecodeAllocation(
            task.request_id,
            self.name,
            accepted,
            list(request.block_ids) if accepted else [],
            "" if accepted else "no free blocks or sequence slots",
            free,
            task.attempt,
            request.num_cached_tokens // self.core.block_manager.block_size if accepted else 0,
        )
        self.counters.add("allocations_accepted" if accepted else "allocations_refused")
        try:
            self.senders.send(task.reply_to, reply)
        except ChannelError:
            # P is unreachable: it will never send KV, so give the blocks back now.
            self._drop(task.request_id, RequestStatus.FINISHED_ERROR)

    def _on_cancel(self, msg: CancelDecode) -> None:
        if not self._holds(msg.request_id, msg.attempt) or not self._drop(
            msg.request_id, RequestStatus.FINISHED_ABORTED
        ):
            self.counters.add("unknown_request_messages")

    def _holds(self, request_id: str, attempt: int) -> bool:
        """Whether this instance holds `request_id` for `attempt` (not an older or newer one)."""
        with self.loop.lock:
            remote = self._remote.get(request_id)
            return remote is not None and remote.attempt == attempt

    def _on_kv_complete(self, msg: KvComplete) -> None:
        with self.loop.lock:
            remote = self._remote.get(msg.request_id)
            if remote is None or remote.attempt != msg.attempt:
                self.counters.add("unknown_request_messages")
                return
            if not msg.ok or remote.aborted:
                reason = msg.error or "aborted"
                self._drop(
                    msg.request_id,
                    RequestStatus.FINISHED_ERROR,
                    notify=not (remote.aborted or msg.client_informed),
                    reason=f"KV transfer failed: {reason}",
                )
                return
            remote.transfer_stamps = Timings(
                kv_signalled=msg.signalled_time,
                writes_done=msg.writes_done_time,
                kv_complete=wall_time(),
            )
            delta = self.core.scheduler.start_remote(msg.request_id, msg.first_token_id)
        self.counters.add("kv_complete")
        if delta is not None and delta.finished:
            self._after_step(None, [delta])
        self.loop.wake()

    def _on_abort(self, msg: AbortRequest) -> None:
        with self.loop.lock:
            remote = self._remote.get(msg.request_id)
            request = self.core.scheduler.requests.get(msg.request_id)
            if remote is None or request is None or not msg.covers(remote.attempt):
                self.counters.add("unknown_request_messages")
                return
            if request.status is RequestStatus.WAITING_FOR_KV:
                remote.aborted = True  # KV may be in flight: free on KvComplete or lease expiry
                return
        self._drop(msg.request_id, RequestStatus.FINISHED_ABORTED, notify=False)

    def _drop(
        self, request_id: str, status: RequestStatus, notify: bool = False, reason: str = ""
    ) -> bool:
        """Finish a request here, freeing its blocks; optionally tell its router why."""
        with self.loop.lock:
            remote = self._remote.pop(request_id, None)
            request = self.core.scheduler.requests.get(request_id)
            index = request.num_output_tokens if request else 0
            known = self.core.abort_request(request_id, status)
        if notify and remote is not None:
            item = TokenPublisher.error_item(request_id, remote.attempt, index, reason)
            self.publisher.publish({remote.router_inbox: [item]})
        return known

    # ------------------------------------------------------------------ engine thread
    def _expire_leases(self) -> None:
        lease = self.config.decode.kv_lease_timeout_s
        now = time.monotonic()
        with self.loop.lock:
            expired = [
                rid
                for rid, remote in self._remote.items()
                if now - remote.reserved_at > lease and self._waiting_for_kv(rid)
            ]
        for rid in expired:
            self.counters.add("leases_expired")
            self._drop(
                rid,
                RequestStatus.FINISHED_ERROR,
                notify=True,
                reason=f"KV did not arrive within {lease:.0f} s",
            )

    def _waiting_for_kv(self, request_id: str) -> bool:
        request = self.core.scheduler.requests.get(request_id)
        return request is not None and request.status is RequestStatus.WAITING_FOR_KV

    def _after_step(self, sched: SchedulerOutput | None, deltas: list[TokenDelta]) -> None:
        by_router: dict[str, list[TokenItem]] = defaultdict(list)
        now = wall_time()
        with self.loop.lock:
            for delta in deltas:
                remote = self._remote.get(delta.request_id)
                if remote is None:
                    continue
                timings = None
                if delta.first_index == 1:  # the first token D computed
                    timings = remote.transfer_stamps
                    timings.first_decode_step = now
                item = TokenPublisher.item(delta, remote.attempt, timings=timings)
                by_router[remote.router_inbox].append(item)
                if delta.finished:
                    del self._remote[delta.request_id]
        self.publisher.publish(by_router)

    def _on_failure(self, sched: SchedulerOutput, error: str) -> None:
        by_router: dict[str, list[TokenItem]] = defaultdict(list)
        with self.loop.lock:
            for chunk in sched.chunks:
                remote = self._remote.pop(chunk.request_id, None)
                if remote is not None:
                    item = TokenPublisher.error_item(
                        chunk.request_id, remote.attempt, chunk.num_generated, error
                    )
                    by_router[remote.router_inbox].append(item)
        self.publisher.publish(by_router)

    # ------------------------------------------------------------------ inspection
    def is_ready(self) -> bool:
        """False until setup() ran (also right after Ray restarted this actor)."""
        if not hasattr(self, "loop"):
            return False
        return self.loop.alive and self._receiver.is_alive()

    def heartbeat_age_s(self) -> float | None:
        """Seconds since the engine loop last went round; None before setup() (restarted)."""
        return self.loop.heartbeat_age_s() if hasattr(self, "loop") else None

    def stats(self) -> dict:
        with self.loop.lock:
            stats = engine_stats(
                self.name,
                self.role.value,
                self.inbox.address,
                self.core,
                self.counters,
                len(self._remote),
            )
            stats["waiting_for_kv"] = self.core.scheduler.num_with_status(
                RequestStatus.WAITING_FOR_KV
            )
        stats["transfer"] = self.backend.stats()
        return stats

    def shutdown(self) -> None:
        self._stop.set()
        self._receiver.join(5)
        self.loop.stop()
        self.inbox.close()
        self.senders.close()
        self.backend.close()
