"""Prefill instance: prepare pool + prefill-role engine + the link to its cache messager.

Threads: the control thread reads the inbox (GenerateRequest, AbortRequest, DecodeAllocation,
TransferDone) and never blocks on a peer; the prepare pool runs preparations; the engine thread
runs prefill steps, announcing each step and each finished layer to the cache messager, sends the
first token to the router at once, and frees a request's blocks when the messager reports its
transfer done (or failed).
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections import defaultdict

from cache_transfer.factory import make_shared_kv
from cluster.config import PdserveConfig
from cluster.instances.common import (
    Counters,
    TokenPublisher,
    advertised_host,
    deployment_id,
    engine_stats,
    wall_time,
)
from cluster.instances.decode_picker import DecodePeer, DecodePicker
from cluster.instances.engine_loop import EngineLoop
from cluster.instances.messager_link import MessagerLink
from cluster.instances.prefill_tracking import TrackedRequest, transfer_counter
from cluster.instances.prepare_pool import (
    Preparation,
    PrepareHooks,
    PreparePool,
    cache_task_for,
)
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
from engine.protocol.channels import ChannelError, Inbox, SenderPool
from engine.protocol.identity import InstanceId
from engine.protocol.requests import AbortRequest, GenerateRequest
from engine.protocol.splitwise import CancelDecode, DecodeAllocation
from engine.protocol.tokens import Timings, TokenItem
from engine.request import Request, RequestStatus
from worker.engine_core import EngineCore, kv_layout_for, resolve_device


class PrefillInstance:
    role = Role.PREFILL

    def __init__(self, name: InstanceId, config: dict) -> None:
        self.name = name
        self.config = PdserveConfig.model_validate(config)
        self.counters = Counters()
        self._tracked: dict[str, TrackedRequest] = {}
        self._transfer_done: queue.SimpleQueue[TransferDone] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._messager_inbox: str | None = None
        self._step_id = -1
        self.transfer_seconds = BucketHistogram()

    def setup(self) -> dict:
        """Allocate the KV cache where the messager can map it, load the model, start the
        threads."""
        self.host = advertised_host(self.config)
        cfg = self.config
        layout, dtype = kv_layout_for(cfg.model, cfg.prefill.engine)
        prefix = f"pdserve-{deployment_id()}-{self.name}"
        device = resolve_device(cfg.model)
        self.kv = make_shared_kv(layout, dtype, device, prefix)
        self._block_bytes = layout.block_nbytes * layout.num_layers  # one block, every layer
        self.link = MessagerLink(self._send_messager, device, self.name)
        self.core = EngineCore(
            cfg.model,
            cfg.prefill.engine,
            Role.PREFILL,
            kv_tensors=self.kv.layer_tensors(),
            layer_done=self._layer_done,
        )
        self.senders = SenderPool()
        self.publisher = TokenPublisher(self.name, self.senders, self.counters)
        self.loop = EngineLoop(
            self.core,
            self._after_step,
            tick=self._tick,
            before_execute=self._announce_step,
            on_failure=self._on_failure,
            name=f"{self.name}-engine",
        )
        self.publisher.report_cache(self.loop, self.core.block_manager)
        accept = (GenerateRequest, AbortRequest, DecodeAllocation, TransferDone)
        self.inbox = Inbox(self.host, accept=accept, name=str(self.name))
        timeout = cfg.prefill.allocation_timeout_s
        self.picker = DecodePicker(
            [], penalty_s=2 * timeout, suspect_after_s=min(0.25, timeout / 4)
        )
        self.pool = PreparePool(cfg.prefill, self.picker, self._hooks(), self.senders)
        self._receiver = threading.Thread(target=self._receive, daemon=True)
        self.loop.start()
        self._receiver.start()
        return {
            "name": self.name,
            "role": self.role.value,
            "inbox": self.inbox.address,
            "max_model_len": self.core.max_model_len,
            "kv_cache": self.kv.handle(),
            "node_ip": self.host,  # the messager binds beside P
        }

    def connect(self, messager_inbox: str, decodes: list[dict]) -> None:
        """Wire this instance to its cache messager and the decode instances (again after one of
        them restarted). A new messager knows none of the old one's cache tasks: those requests
        end with an error."""
        replaced = self._messager_inbox is not None and messager_inbox != self._messager_inbox
        self.picker.set_peers(
            [DecodePeer(d["name"], d["inbox"], d["num_blocks"], d["num_blocks"]) for d in decodes]
        )
        if replaced:
            self._end_tracked(lambda t: True, "the cache messager restarted", free_now=True)
        self._messager_inbox = messager_inbox

    def decode_down(self, decode_name: InstanceId) -> None:
        """A decode instance died: choose it no more, and end the requests bound for it."""
        self.picker.remove(decode_name)
        self._end_tracked(lambda t: t.decode == decode_name, f"{decode_name} failed")

    def _end_tracked(self, which, error: str, free_now: bool = False) -> None:
        """End tracked requests with an error to their clients. Normally the messager drains
        their writes first (CancelCache -> TransferDone frees); `free_now` when the messager that
        held them is gone, so nothing can still read the blocks."""
        with self.loop.lock:
            chosen = [(rid, t) for rid, t in self._tracked.items() if which(t)]
            for rid, _ in chosen:
                request = self.core.scheduler.requests.get(rid)
                if free_now or (request and request.status is not RequestStatus.SENDING_KV):
                    self.core.abort_request(rid, RequestStatus.FINISHED_ERROR)
                if free_now:
                    del self._tracked[rid]
        for rid, tracked in chosen:
            if tracked.reply_to:
                item = TokenPublisher.error_item(rid, tracked.attempt, 1, error)
                self.publisher.publish({tracked.reply_to: [item]})
                tracked.reply_to = ""
            if not free_now:
                self._send_messager(CancelCache(rid, error, client_informed=True))
        self.pool.notify_progress()
        self.counters.add("requests_ended_by_failure", len(chosen))

    def _hooks(self) -> PrepareHooks:
        return PrepareHooks(
            reserve=self._reserve,
            unreserve=self._unreserve,
            admit=self._admit,
            fail=self._fail,
            backlog_ok=self._backlog_ok,
            eos_token_ids=self.core.eos_token_ids,
            inbox=self.inbox.address,
            name=self.name,
        )

    # ------------------------------------------------------------------ control thread
    def _receive(self) -> None:
        while not self._stop.is_set():
            msg = self.inbox.recv(timeout_s=0.5)
            if isinstance(msg, GenerateRequest):
                self._on_generate(msg)
            elif isinstance(msg, DecodeAllocation):
                if not self.pool.on_allocation(msg):
                    self._cancel_late_allocation(msg)
            elif isinstance(msg, TransferDone):
                self._transfer_done.put(msg)
                self.loop.wake()
            elif isinstance(msg, AbortRequest):
                self._on_abort(msg)

    def _on_generate(self, msg: GenerateRequest) -> None:
        try:
            request = Request(
                msg.request_id, msg.prompt_token_ids, msg.sampling, self.core.eos_token_ids
            )
        except (ValueError, TypeError) as exc:
            self._fail(msg, f"invalid request: {exc}")
            return
        self.counters.add("requests")
        self.pool.submit(Preparation(msg, request))

    def _cancel_late_allocation(self, msg: DecodeAllocation) -> None:
        """An acceptance nobody waits for any more: give D its blocks back."""
        self.counters.add("late_allocations")
        if msg.accepted:
            inbox = self.picker.inbox_of(msg.decode_instance)
            if inbox is not None:
                cancel = CancelDecode(msg.request_id, "late allocation", msg.attempt)
                self.senders.send(inbox, cancel)

    def _on_abort(self, msg: AbortRequest) -> None:
        if self.pool.abort(msg):
            return
        request_id = msg.request_id
        with self.loop.lock:
            tracked = self._tracked.get(request_id)
            request = self.core.scheduler.requests.get(request_id)
            if tracked is None or request is None or not msg.covers(tracked.attempt):
                self.counters.add("unknown_request_messages")
                return
            if request.status is not RequestStatus.SENDING_KV:
                self.core.abort_request(request_id)
            tracked.reply_to = ""  # the client is gone: publish nothing more
            tracked.cancelled_on_purpose = True
        # The messager drains in-flight writes, frees D, then reports TransferDone.
        self._send_messager(CancelCache(request_id, "aborted", client_informed=True))

    # ------------------------------------------------------------------ prepare hooks
    def _backlog_ok(self) -> bool:
        """Prompt tokens admitted but not yet computed, against `prefill.max_backlog_tokens`."""
        with self.loop.lock:
            backlog = sum(
                r.num_prompt_tokens - r.num_computed_tokens
                for r in self.core.scheduler.requests.values()
                if r.status in (RequestStatus.WAITING, RequestStatus.RUNNING)
            )
        return backlog < self.config.prefill.max_backlog_tokens

    def _reserve(self, request: Request) -> bool:
        with self.loop.lock:
            return self.core.scheduler.reserve_prefill(request)

    def _unreserve(self, request_id: str) -> None:
        with self.loop.lock:
            self.core.abort_request(request_id)
        self.pool.notify_progress()

    def _admit(self, prep: Preparation, peer: DecodePeer, reply: DecodeAllocation) -> None:
        task: CacheTask = cache_task_for(prep, peer, reply, self.config.decode.kv_lease_timeout_s)
        self._send_messager(task)  # before the scheduler sees it: the messager knows it first
        self.counters.add("transfer_bytes_skipped", task.skip_blocks * self._block_bytes)
        rid = prep.request.request_id
        timings = Timings(arrival=prep.msg.arrival_time, prepared=prep.prepared_at)
        tracked = TrackedRequest(prep.msg.reply_to, peer.name, prep.msg.attempt, timings)
        with self.loop.lock:
            self._tracked[rid] = tracked
            self.core.scheduler.add_request(prep.request)
        self.loop.wake()

    def _fail(self, msg: GenerateRequest, error: str, overloaded: bool = False) -> None:
        self.counters.add("overloaded_requests" if overloaded else "failed_requests")
        item = TokenPublisher.error_item(msg.request_id, msg.attempt, 0, error, overloaded)
        self.publisher.publish({msg.reply_to: [item]})

    # ------------------------------------------------------------------ engine thread
    def _announce_step(self, sched: SchedulerOutput) -> None:
        now = wall_time()
        chunks = []
        with self.loop.lock:
            for chunk in sched.chunks:
                tracked = self._tracked.get(chunk.request_id)
                if tracked is not None and tracked.timings.prefill_start is None:
                    tracked.timings.prefill_start = now
                chunks.append(ChunkPlan(chunk.request_id, chunk.end_pos, chunk.sample))
        self._step_id = sched.step_id
        self.link.send(StepPlan(sched.step_id, chunks))

    def _layer_done(self, layer: int) -> None:
        self.link.layer_written(LayerReady(self._step_id, layer))

    def _after_step(self, sched: SchedulerOutput, deltas: list[TokenDelta]) -> None:
        self.pool.notify_progress()
        by_router: dict[str, list[TokenItem]] = defaultdict(list)
        now = wall_time()
        for delta in deltas:
            with self.loop.lock:
                tracked = self._tracked.get(delta.request_id)
            if tracked is None:
                continue
            tracked.timings.prefill_end = now
            if tracked.reply_to:
                timings = dataclasses.replace(tracked.timings)
                item = TokenPublisher.item(delta, tracked.attempt, tracked.decode, timings)
                by_router[tracked.reply_to].append(item)
            if delta.status is RequestStatus.SENDING_KV:
                tracked.transfer_started = time.monotonic()
                self.link.send(PrefillDone(delta.request_id, delta.new_token_ids[0]))
            else:  # finished on P (EOS, max_tokens 1): D's reservation must go
                tracked.reply_to = ""  # the client has its whole answer
                tracked.cancelled_on_purpose = True
                cancel = CancelCache(delta.request_id, "finished on prefill", client_informed=True)
                self.link.send(cancel)
        self.publisher.publish(by_router)

    def _tick(self) -> None:
        while True:
            try:
                done = self._transfer_done.get_nowait()
            except queue.Empty:
                break
            self._finish_transfer(done)
        self._check_transfer_deadlines()

    def _finish_transfer(self, done: TransferDone) -> None:
        status = RequestStatus.FINISHED_STOPPED if done.ok else RequestStatus.FINISHED_ERROR
        with self.loop.lock:
            tracked = self._tracked.pop(done.request_id, None)
            self.core.scheduler.release_sent(done.request_id, status)
        self.pool.notify_progress()
        self.counters.add(transfer_counter(done, tracked))
        self.counters.add("transfer_bytes", done.nbytes)
        if done.ok:
            self.transfer_seconds.observe(done.seconds)
        if not done.ok and tracked is not None and tracked.reply_to:
            error = TokenPublisher.error_item(
                done.request_id, tracked.attempt, 1, f"KV transfer: {done.error}"
            )
            self.publisher.publish({tracked.reply_to: [error]})

    def _check_transfer_deadlines(self) -> None:
        """Ask the messager to give up on slow transfers; free blocks if it never answers."""
        timeout = self.config.prefill.transfer_timeout_s
        now = time.monotonic()
        with self.loop.lock:
            late = [
                (rid, t)
                for rid, t in self._tracked.items()
                if t.transfer_started and now - t.transfer_started > timeout
            ]
        for rid, tracked in late:
            if not tracked.cancel_sent:
                tracked.cancel_sent = True
                self._send_messager(CancelCache(rid, f"transfer exceeded {timeout:.0f} s"))
            elif now - tracked.transfer_started > 2 * timeout:  # the messager is gone
                self._finish_transfer(TransferDone(rid, False, "cache messager did not answer"))

    def _on_failure(self, sched: SchedulerOutput, error: str) -> None:
        for chunk in sched.chunks:
            with self.loop.lock:
                tracked = self._tracked.pop(chunk.request_id, None)
            if tracked is None:
                continue
            cancel = CancelCache(chunk.request_id, "prefill step failed", client_informed=True)
            self._send_messager(cancel)
            if tracked.reply_to:
                item = TokenPublisher.error_item(chunk.request_id, tracked.attempt, 0, error)
                self.publisher.publish({tracked.reply_to: [item]})
        self.pool.notify_progress()

    def _send_messager(self, msg) -> None:
        assert self._messager_inbox is not None, "connect() first"
        try:
            self.senders.send(self._messager_inbox, msg)
        except ChannelError:
            self.counters.add("messager_send_failures")

    # ------------------------------------------------------------------ inspection
    def is_ready(self) -> bool:
        """False until setup() and connect() ran (also right after Ray restarted this actor)."""
        if not hasattr(self, "loop"):
            return False
        return self.loop.alive and self._receiver.is_alive() and self._messager_inbox is not None

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
                len(self._tracked),
            )
            stats["sending_kv"] = self.core.scheduler.num_with_status(RequestStatus.SENDING_KV)
        stats["prepare_queue"] = self.pool.queue_depth
        stats["decodes"] = self.picker.snapshot()
        stats["transfer_seconds"] = self.transfer_seconds.to_dict()
        stats["dropped_layer_signals"] = self.link.dropped_signals
        return stats

    def shutdown(self) -> None:
        self._stop.set()
        self._receiver.join(5)
        self.pool.shutdown()
        self.loop.stop()
        self.link.close()
        self.inbox.close()
        self.senders.close()
        self.kv.close()  # the owner's close also unlinks a shared-memory segment
