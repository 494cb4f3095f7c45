"""Mixed (colocated) instance: prefill and decode in one engine, classic continuous batching.

It serves small deployments and is the baseline every PD measurement is compared against.
"""

from __future__ import annotations

import threading
from collections import defaultdict

from cluster.config import PdserveConfig
from cluster.instances.common import (
    Counters,
    TokenPublisher,
    advertised_host,
    engine_stats,
)
from cluster.instances.engine_loop import EngineLoop
from engine.batch import SchedulerOutput
from engine.config import Role
from engine.outputs import TokenDelta
from engine.protocol.channels import Inbox, SenderPool
from engine.protocol.identity import InstanceId
from engine.protocol.requests import AbortRequest, GenerateRequest
from engine.protocol.tokens import TokenItem
from engine.request import Request
from worker.engine_core import EngineCore, resolve_overlap


class MixedInstance:
    role = Role.MIXED

    def __init__(self, name: InstanceId, config: dict) -> None:
        self.name = name
        self.config = PdserveConfig.model_validate(config)
        self.counters = Counters()
        self._clients: dict[str, GenerateRequest] = {}  # request id -> the router's request
        self._stop = threading.Event()

    def setup(self) -> dict:
        """Load the model, bind the inbox, start the threads; returns the endpoint."""
        self.host = advertised_host(self.config)
        overlap = resolve_overlap(self.config.mixed.overlap_schedule, self.config.model)
        self.core = EngineCore(
            self.config.model, self.config.mixed.engine, Role.MIXED, overlap=overlap
        )
        self.senders = SenderPool()
        self.publisher = TokenPublisher(self.name, self.senders, self.counters)
        self.loop = EngineLoop(
            self.core, self._after_step, on_failure=self._on_failure, name=f"{self.name}-engine"
        )
        self.publisher.report_cache(self.loop, self.core.block_manager)
        self.inbox = Inbox(self.host, accept=(GenerateRequest, AbortRequest), name=str(self.name))
        self._receiver = threading.Thread(target=self._receive, daemon=True)
        self.loop.start()
        self._receiver.start()
        return {
            "name": self.name,
            "role": self.role.value,
            "inbox": self.inbox.address,
            "max_model_len": self.core.max_model_len,
        }

    def _receive(self) -> None:
        while not self._stop.is_set():
            msg = self.inbox.recv(timeout_s=0.5)
            if isinstance(msg, GenerateRequest):
                self._add(msg)
            elif isinstance(msg, AbortRequest):
                self._abort(msg)

    def _abort(self, msg: AbortRequest) -> None:
        with self.loop.lock:
            client = self._clients.get(msg.request_id)
            if client is None or not msg.covers(client.attempt):
                self.counters.add("unknown_request_messages")
                return
            self.core.abort_request(msg.request_id)
            del self._clients[msg.request_id]

    def _add(self, msg: GenerateRequest) -> None:
        try:
            request = Request(msg.request_id, msg.prompt_token_ids, msg.sampling)
            with self.loop.lock:
                self.core.add_request(request)
                self._clients[msg.request_id] = msg
        except (ValueError, TypeError) as exc:
            error = f"invalid request: {exc}"
            item = TokenPublisher.error_item(msg.request_id, msg.attempt, 0, error)
            self.publisher.publish({msg.reply_to: [item]})
            return
        self.counters.add("requests")
        self.loop.wake()

    def _after_step(self, sched: SchedulerOutput, deltas: list[TokenDelta]) -> None:
        by_router: dict[str, list[TokenItem]] = defaultdict(list)
        with self.loop.lock:
            for delta in deltas:
                client = self._clients.get(delta.request_id)
                if client is None:
                    continue
                by_router[client.reply_to].append(TokenPublisher.item(delta, client.attempt))
                if delta.finished:
                    del self._clients[delta.request_id]
        self.publisher.publish(by_router)

    def _on_failure(self, sched: SchedulerOutput, error: str) -> None:
        by_router: dict[str, list[TokenItem]] = defaultdict(list)
        with self.loop.lock:
            for chunk in sched.chunks:
                client = self._clients.pop(chunk.request_id, None)
                if client is not None:
                    item = TokenPublisher.error_item(
                        chunk.request_id, client.attempt, chunk.num_generated, error
                    )
                    by_router[client.reply_to].append(item)
        self.publisher.publish(by_router)

    # ------------------------------------------------------------------ inspection
    def is_ready(self) -> bool:
        """False until setup() ran (also right after Ray restarted this actor)."""
        return hasattr(self, "loop") and self.loop.alive

    def heartbeat_age_s(self) -> float | None:
        """Seconds since the engine loop last went round; None before setup() (restarted)."""
        return self.loop.heartbeat_age_s() if hasattr(self, "loop") else None

    def stats(self) -> dict:
        with self.loop.lock:
            return engine_stats(
                self.name,
                self.role.value,
                self.inbox.address,
                self.core,
                self.counters,
                len(self._clients),
            )

    def shutdown(self) -> None:
        self._stop.set()
        self._receiver.join(5)
        self.loop.stop()
        self.inbox.close()
        self.senders.close()
