"""The prefill role of the instance loop: preparation, prefill steps, hand-off to the messager.

A request passes through these states; the loop holds every record, so an abort (or an error)
ends the request in one place whatever its state:
  queued      `queued` (in arrival order): waiting for P's blocks, a short enough backlog and
              an idle worker
  preparing   `preparing`: P's blocks reserved, a prepare worker asks a D for its blocks
  prefilling  admitted (`transfers`): the messager has its CacheTask, the scheduler computes
  sending KV  first token sampled (SENDING_KV): P's blocks are held until the messager's
              TransferDone (its writes read them), so an abort cancels but does not free
Each step is announced to the messager (StepPlan), then each written layer (LayerReady), then
each first token (PrefillDone), all in order through the messager link.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from cache_transfer.factory import rank_kv_wire
from cache_transfer.layer_signals import MessagerLink
from cluster.config import PdserveConfig
from cluster.instances.decode_picker import DecodePeer, DecodePicker
from cluster.instances.loop import Client, InstanceLoop, RolePolicy
from cluster.instances.prepare_pool import Answer, Ask, PrepareWorker
from cluster.instances.roles import build_core, shared_kv
from cluster.metrics import BucketHistogram
from engine.batch import SchedulerOutput
from engine.config import Role
from engine.outputs import TokenDelta
from engine.protocol.cache import (
    CacheTask,
    CancelCache,
    ChunkPlan,
    LayerReady,
    PrefillDone,
    StepPlan,
    TransferDone,
)
from engine.protocol.channels import ChannelError
from engine.protocol.identity import InstanceId
from engine.protocol.requests import AbortRequest, GenerateRequest
from engine.protocol.splitwise import CancelDecode, DecodeAllocation, DecodeTask
from engine.protocol.tokens import Timings
from engine.request import Request, RequestStatus
from worker.engine_core import EngineCore, resolve_device

RESERVE_TIMEOUT_S = 30.0  # longest wait in the queue for P's blocks and backlog


@dataclass
class Preparation:
    msg: GenerateRequest
    request: Request
    tried: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)  # why each D asked did not allocate
    peer: DecodePeer | None = None  # the D asked last
    worker: PrepareWorker | None = None  # while it asks
    reply: DecodeAllocation | None = None  # the last D's answer
    aborted: bool = False


@dataclass
class Transfer:
    """An admitted request's KV hand-off, until the messager's TransferDone (its D is the
    client's `decode`)."""

    started: float = 0.0  # monotonic, when the first token was sampled
    cancel_sent: bool = False
    on_purpose: bool = False  # cancelled on purpose (finished on P, client gone): no failure


class PrefillRole(RolePolicy):
    role = Role.PREFILL
    accepts = (GenerateRequest, TransferDone)

    def __init__(self, name: InstanceId, config: PdserveConfig, host: str) -> None:
        self.device = resolve_device(config.model)
        self.name = name
        self.kv = shared_kv(config, Role.PREFILL, name)  # rank 0's
        self.block_bytes = self.kv.layout.block_nbytes * self.kv.layout.num_layers  # every layer
        self.config = config.prefill
        self.scheduler = self.config.engine.scheduler
        self.lease_s = config.decode.kv_lease_timeout_s
        self.host = host
        timeout = self.config.allocation_timeout_s
        self.picker = DecodePicker([], 2 * timeout, suspect_after_s=min(0.25, timeout / 4))
        # Items are (address, message); on a GPU the link's thread sends them on its own socket.
        self.link = MessagerLink(lambda item: self.loop.senders.send(*item), self.device, name)
        self.messager: str | None = None  # the cache messager's inbox, once connected
        self.queued: dict[str, Preparation] = {}
        self.head_since = 0.0  # monotonic: when the first in the queue became first (or came)
        self.preparing: dict[str, Preparation] = {}
        self.transfers: dict[str, Transfer] = {}
        self.transfer_seconds = BucketHistogram()
        self.reserve_timeout_s = RESERVE_TIMEOUT_S
        self._step_id = -1

    def build_core(self, config: PdserveConfig) -> EngineCore:
        """The engine: rank 0 computes in this role's store and signals each layer written."""
        return build_core(config, Role.PREFILL, self.name, self.kv, layer_done=self.layer_done)

    def attach(self, loop: InstanceLoop) -> None:
        super().attach(loop)
        self.workers = [
            PrepareWorker(self.host, loop.mailbox.put, f"{loop.name}-prepare-{i}")
            for i in range(self.config.prepare_threads)
        ]
        for worker in self.workers:
            worker.start()
        self.idle = list(self.workers)

    # ------------------------------------------------------------------ Ray calls, on the loop
    def connect(self, messager_inbox: str, decodes: list[dict]) -> None:
        """Wire to the cache messager and the decode instances (again after a restart). A new
        messager knows none of the old one's tasks: those requests end, their blocks free."""
        replaced = self.messager is not None and messager_inbox != self.messager
        self.set_decodes(decodes)
        for rid in list(self.transfers) if replaced else []:
            self.loop.fail_client(rid, "the cache messager restarted")
            self.loop.core.abort_request(rid, RequestStatus.FINISHED_ERROR)
            del self.transfers[rid]
            self.loop.counters["requests_ended_by_failure"] += 1
        self.messager = messager_inbox

    def set_decodes(self, decodes: list[dict]) -> None:
        """The decode instances to choose from (one switched roles, or restarted). Requests
        already bound for one no longer listed go on: its messager keeps its connection."""
        self.picker.set_peers(
            [DecodePeer(d["name"], d["inbox"], d["num_blocks"], d["num_blocks"]) for d in decodes]
        )

    def decode_down(self, decode_name: InstanceId) -> None:
        """A decode instance died: choose it no more; end the requests bound for it."""
        self.picker.remove(decode_name)
        for rid, client in list(self.loop.clients.items()):
            if client.decode == decode_name:  # admitted, its transfer not over
                self.loop.fail_request(rid, f"{decode_name} failed")
                self.loop.counters["requests_ended_by_failure"] += 1

    # ------------------------------------------------------------------ messages
    def handle(self, msg: Any) -> None:
        if isinstance(msg, GenerateRequest):
            request = self.loop.new_request(msg)
            if request is not None:
                if not self.queued:
                    self.head_since = time.monotonic()
                self.queued[msg.request_id] = Preparation(msg, request)
                self._start_preparations()
        elif isinstance(msg, Answer):
            self._on_answer(msg)
        elif isinstance(msg, TransferDone):
            self._on_transfer_done(msg)

    def _start_preparations(self) -> None:
        """Reserve P's blocks for queued requests while a worker is idle, the backlog short
        (D's lease on its blocks must cover P's queue) and the blocks there."""
        scheduler = self.loop.core.scheduler
        while self.queued and self.idle and self._backlog_ok():
            rid, prep = next(iter(self.queued.items()))
            if not scheduler.reserve_prefill(prep.request):
                return
            self.preparing[rid] = self._dequeue(rid)
            self._ask_next(prep)

    def _dequeue(self, request_id: str) -> Preparation:
        """Leave the queue; when the first leaves, the next one's wait for capacity starts now
        (those behind it wait only for it, as they would for a thread of a pool)."""
        if request_id == next(iter(self.queued)):
            self.head_since = time.monotonic()
        return self.queued.pop(request_id)

    def _backlog_tokens(self) -> int:
        """Prompt tokens admitted but not computed yet."""
        return sum(
            r.num_prompt_tokens - r.num_computed_tokens
            for r in self.loop.core.scheduler.requests.values()
            if r.status in (RequestStatus.WAITING, RequestStatus.RUNNING)
        )

    def _backlog_ok(self) -> bool:
        return self._backlog_tokens() < self.config.max_backlog_tokens

    def _ask_next(self, prep: Preparation) -> None:
        """Hand the preparation to an idle worker with the best D not tried yet, or give up."""
        rid = prep.request.request_id
        needed = self.loop.core.block_manager.blocks_needed(prep.request.num_prompt_tokens + 1)
        peer = None
        if len(prep.tried) < self.config.max_decode_attempts:
            hint = prep.msg.decode_hint if not prep.tried else None  # the router's choice
            peer = self.picker.choose(needed, exclude=set(prep.tried), prefer=hint)
        if peer is None:
            self._end_preparation(prep)
            reasons = "; ".join(prep.reasons)
            self._overloaded(rid, f"no decode instance could take the request ({reasons})")
            return
        prep.tried.append(peer.name)
        prep.peer, prep.worker = peer, self.idle.pop()
        task = DecodeTask(
            request_id=rid,
            prompt_token_ids=prep.request.prompt_token_ids,
            sampling=prep.request.sampling_params,
            eos_token_ids=list(prep.request.eos_token_ids),
            reply_to=prep.worker.inbox.address,
            router_inbox=prep.msg.reply_to,
            reuse_prefix=prep.msg.reuse_decode_prefix,
        )
        prep.worker.submit(Ask(peer.name, peer.inbox, task, self.config.allocation_timeout_s))

    def _on_answer(self, answer: Answer) -> None:
        if answer.late:
            self.loop.counters["late_allocations"] += 1
            return
        self.idle.append(answer.worker)
        rid, reply = answer.request_id, answer.reply
        if reply is not None:
            self.picker.on_reply(answer.peer, reply.free_blocks)
        elif answer.why in ("timeout", "unreachable"):
            self.picker.on_timeout(answer.peer)
        else:
            self.picker.abandon(answer.peer)
        prep = self.preparing[rid]
        prep.worker, prep.reply = None, reply
        if prep.aborted:
            self._end_preparation(prep)
        elif answer.why.startswith("internal"):
            self.loop.fail_request(rid, f"internal error while preparing: {answer.why}")
        elif reply is not None and reply.accepted:
            self._admit(prep, reply)
        else:
            prep.reasons.append(f"{answer.peer}: {reply.reason if reply else answer.why}")
            self._ask_next(prep)
        self._start_preparations()

    def _end_preparation(self, prep: Preparation) -> None:
        """Give back P's blocks and D's (if it allocated) of a preparation no worker holds."""
        rid = prep.request.request_id
        del self.preparing[rid]
        self.loop.core.abort_request(rid)
        if prep.reply is not None and prep.reply.accepted and prep.peer is not None:
            cancel = CancelDecode(rid, "request ended while preparing")
            self.loop.send(prep.peer.inbox, cancel, "decode_send_failures")

    def _admit(self, prep: Preparation, reply: DecodeAllocation) -> None:
        rid = prep.request.request_id
        del self.preparing[rid]
        assert prep.peer is not None
        src = list(prep.request.block_ids)
        # The messager learns of the task before the scheduler may run the request. Writes must
        # start before D's lease on the blocks can run out (D started it before replying).
        task = CacheTask(
            request_id=rid,
            decode_instance=prep.peer.name,
            decode_inbox=prep.peer.inbox,
            src_block_ids=src,
            dst_block_ids=list(reply.block_ids[: len(src)]),
            num_prompt_tokens=prep.request.num_prompt_tokens,
            write_deadline=time.time() + self.lease_s - max(2.0, 0.2 * self.lease_s),
            skip_blocks=reply.cached_blocks,  # D holds these already: never written
        )
        self._to_messager(task)
        self.loop.counters["transfer_bytes_skipped"] += reply.cached_blocks * self.block_bytes
        self.transfers[rid] = Transfer()
        client = self.loop.clients[rid]
        client.decode = prep.peer.name
        client.timings.prepared = time.time()
        self.loop.core.scheduler.add_request(prep.request)

    def _on_transfer_done(self, done: TransferDone) -> None:
        transfer = self.transfers.pop(done.request_id, None)
        if transfer is None:  # e.g. the answer to a cancel after the transfer had ended
            self.loop.counters["unknown_request_messages"] += 1
            return
        if done.ok:
            self.loop.clients.pop(done.request_id, None)
            self.transfer_seconds.observe(done.seconds)
        else:
            self.loop.fail_client(done.request_id, f"KV transfer: {done.error}")
        status = RequestStatus.FINISHED_STOPPED if done.ok else RequestStatus.FINISHED_ERROR
        self.loop.core.scheduler.release_sent(done.request_id, status)
        # `transfers_failed` counts failures only, not transfers cancelled on purpose.
        end = "ok" if done.ok else "cancelled" if transfer.on_purpose else "failed"
        self.loop.counters[f"transfers_{end}"] += 1
        self.loop.counters["transfer_bytes"] += done.nbytes

    def drop(self, request_id: str, status: RequestStatus, reason: str) -> bool:
        if request_id in self.queued:
            self._dequeue(request_id)
            return True
        prep = self.preparing.get(request_id)
        if prep is not None and prep.worker is None:  # answered; its handling failed
            self._end_preparation(prep)
        elif prep is not None and not prep.aborted:  # P's blocks now, D's once answered
            prep.aborted = True
            self.loop.core.abort_request(request_id, status)
            msg = AbortRequest(request_id, reason)  # the worker stops waiting for D
            self.loop.send(prep.worker.inbox.address, msg, "worker_send_failures")
        if prep is not None:
            return True
        transfer = self.transfers.get(request_id)
        request = self.loop.core.scheduler.requests.get(request_id)
        if request is not None and request.status is not RequestStatus.SENDING_KV:
            self.loop.core.abort_request(request_id, status)
        if transfer is None:
            return request is not None
        # The messager drains in-flight writes, frees D, then reports TransferDone.
        transfer.on_purpose = transfer.on_purpose or status is RequestStatus.FINISHED_ABORTED
        transfer.started = transfer.started or time.monotonic()  # its deadline now runs
        transfer.cancel_sent = True
        self._to_messager(CancelCache(request_id, reason, client_informed=True))
        return True

    # ------------------------------------------------------------------ steps
    def before_step(self, sched: SchedulerOutput) -> None:
        now = time.time()
        for chunk in sched.chunks:
            client = self.loop.clients.get(chunk.request_id)
            if client is not None and client.timings.prefill_start is None:
                client.timings.prefill_start = now
        self._step_id = sched.step_id
        chunks = [ChunkPlan(c.request_id, c.end_pos, c.sample) for c in sched.chunks]
        self._to_messager(StepPlan(sched.step_id, chunks))

    def layer_done(self, layer: int) -> None:
        """The model wrote a layer's KV (on a GPU: queued its kernels; the link waits). Not while
        the loop serves another role (elastic): those steps' KV is not the messager's."""
        if self.messager is not None and self.loop.policy is self:
            self.link.layer_written((self.messager, LayerReady(self._step_id, layer)))

    def stamps(self, delta: TokenDelta, client: Client, now: float) -> Timings | None:
        client.timings.prefill_end = now
        return client.timings

    def after_delta(self, delta: TokenDelta) -> None:
        transfer = self.transfers.get(delta.request_id)
        if transfer is None:
            return
        if delta.status is RequestStatus.SENDING_KV:
            transfer.started = time.monotonic()
            self._to_messager(PrefillDone(delta.request_id, delta.new_token_ids[0]))
        else:  # finished on P (EOS, max_tokens 1): D's reservation must go
            transfer.on_purpose = True
            reason = "finished on prefill"
            self._to_messager(CancelCache(delta.request_id, reason, client_informed=True))

    def tick(self) -> None:
        """Deadlines: slow transfers, requests queued too long; then start what now fits."""
        timeout = self.config.transfer_timeout_s
        now = time.monotonic()
        for rid, transfer in list(self.transfers.items()):
            if not transfer.started or now - transfer.started <= timeout:
                continue
            if not transfer.cancel_sent:
                transfer.cancel_sent = True
                self._to_messager(CancelCache(rid, f"transfer exceeded {timeout:.0f} s"))
            elif now - transfer.started > 2 * timeout:  # the messager is gone
                self._on_transfer_done(TransferDone(rid, False, "cache messager did not answer"))
        while self.queued and now - self.head_since > self.reserve_timeout_s:
            rid = next(iter(self.queued))
            self._dequeue(rid)
            why = "has no free KV blocks" if self._backlog_ok() else "is overloaded"
            self._overloaded(rid, f"prefill instance {why} (timed out)")
        self._start_preparations()

    # ------------------------------------------------------------------ helpers
    def _overloaded(self, request_id: str, error: str) -> None:
        """A capacity refusal: the client may retry (503 + Retry-After at the router)."""
        self.loop.counters["overloaded_requests"] += 1
        self.loop.fail_client(request_id, error, overloaded=True)

    def _to_messager(self, msg: Any) -> None:
        """In order with the layer signals (one FIFO on a GPU)."""
        try:
            if self.messager is None:
                raise ChannelError("no cache messager connected yet")
            self.link.send((self.messager, msg))
        except ChannelError:
            self.loop.counters["messager_send_failures"] += 1

    def ready(self) -> bool:
        return self.messager is not None

    def in_flight(self) -> int:
        return len(self.queued) + len(self.preparing) + len(self.transfers)

    def movable(self) -> list[str]:
        """Prompts still queued go to another prefill instance (the router retries them);
        preparations and transfers finish within their own deadlines."""
        return list(self.queued)

    def deactivate(self) -> None:
        """Serving another role: no layer signals to the messager from the steps of that role
        (`connect` gives it back on a switch to prefill)."""
        self.messager = None

    def info(self) -> dict:
        core = self.loop.core  # every rank's KV store, for the messager (it binds beside P)
        handles = [self.kv.handle(), *core.rank_kv_handles[1:]]
        return {"kv_cache": rank_kv_wire(handles, core.kv_head_ranges), "node_ip": self.host}

    def stats(self) -> dict:
        scheduler = self.loop.core.scheduler
        return {
            "sending_kv": scheduler.num_with_status(RequestStatus.SENDING_KV),
            "prepare_queue": len(self.queued) + len(self.preparing),
            "backlog_tokens": self._backlog_tokens(),
            "tracked": len(self.loop.clients.keys() | self.transfers.keys()),
            "decodes": self.picker.snapshot(),
            "transfer_seconds": self.transfer_seconds.to_dict(),
            "dropped_layer_signals": self.link.dropped_signals,
        }

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.link.close()
        self.kv.close()  # the owner's close also unlinks a shared-memory segment
