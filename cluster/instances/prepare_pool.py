"""The prefill instance's prepare pool: N threads, each running one request's whole preparation.

For one request a thread (a) reserves P's KV blocks (prefix cache consulted), (b) picks a decode
instance and sends it the splitwise task, (c) waits for D's allocation with a deadline and tries
another D on refusal or timeout (bounded), (d) hands the cache task to the cache messager and
(e) hands the request to P's scheduler. A slow D only holds the thread that chose it; the picker
steers other requests away from it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from cluster.config import PrefillConfig
from cluster.instances.decode_picker import DecodePeer, DecodePicker
from engine.protocol.cache import CacheTask
from engine.protocol.channels import ChannelError, SenderPool
from engine.protocol.identity import InstanceId
from engine.protocol.requests import AbortRequest, GenerateRequest
from engine.protocol.splitwise import CancelDecode, DecodeAllocation, DecodeTask
from engine.request import Request

log = logging.getLogger(__name__)


class PrepareFailed(Exception):
    """No capacity to prepare the request (P's blocks, P's queue, every D asked): the client
    gets the message with a hint to retry (503 + Retry-After at the router)."""


@dataclass
class Preparation:
    """One request on its way through the pool; `aborted` may be set by another thread."""

    msg: GenerateRequest
    request: Request
    aborted: threading.Event = field(default_factory=threading.Event)
    reply: DecodeAllocation | None = None
    replied: threading.Event = field(default_factory=threading.Event)
    waiting_on: InstanceId | None = None  # the D whose answer this thread awaits
    prepared_at: float = 0.0


@dataclass
class PrepareHooks:
    """What the pool needs from its prefill instance (kept narrow so it is testable alone)."""

    reserve: Callable[[Request], bool]  # take P's blocks; False if P is full now
    unreserve: Callable[[str], None]  # give P's blocks back (request never started)
    admit: Callable[[Preparation, DecodePeer, DecodeAllocation], None]  # (d) + (e)
    fail: Callable[..., None]  # (msg, error, overloaded=False): tell the client
    backlog_ok: Callable[[], bool]  # P's queue is short enough to ask a D for blocks now
    eos_token_ids: tuple[int, ...]
    inbox: str  # P's inbox, where D answers
    name: InstanceId


class PreparePool:
    def __init__(
        self,
        config: PrefillConfig,
        picker: DecodePicker,
        hooks: PrepareHooks,
        senders: SenderPool,
        reserve_timeout_s: float = 30.0,
    ) -> None:
        self.config = config
        self.picker = picker
        self.hooks = hooks
        self.senders = senders
        self.reserve_timeout_s = reserve_timeout_s
        self._executor = ThreadPoolExecutor(config.prepare_threads, thread_name_prefix="prepare")
        self._lock = threading.Lock()
        self._active: dict[str, Preparation] = {}
        self.progress = threading.Condition()

    # ------------------------------------------------------------------ called by other threads
    def submit(self, preparation: Preparation) -> None:
        with self._lock:
            self._active[preparation.request.request_id] = preparation
        self._executor.submit(self._run, preparation)

    def on_allocation(self, reply: DecodeAllocation) -> bool:
        """Route D's answer to the waiting thread. False if nobody waits for it (late)."""
        self.picker.on_reply(reply.decode_instance, reply.free_blocks)
        with self._lock:
            prep = self._active.get(reply.request_id)
            if prep is None or prep.waiting_on != reply.decode_instance or prep.replied.is_set():
                return False
            prep.reply = reply
            prep.replied.set()
            return True

    def abort(self, msg: AbortRequest) -> bool:
        with self._lock:
            prep = self._active.get(msg.request_id)
        if prep is None or not msg.covers(prep.msg.attempt):
            return False
        prep.aborted.set()
        prep.replied.set()  # wake the thread if it is waiting on D
        with self.progress:
            self.progress.notify_all()
        return True

    def notify_progress(self) -> None:
        """P freed blocks or finished a step: waiting preparations look again."""
        with self.progress:
            self.progress.notify_all()

    @property
    def queue_depth(self) -> int:
        with self._lock:
            return len(self._active)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ one request
    def _run(self, prep: Preparation) -> None:
        rid = prep.request.request_id
        reserved = False
        try:
            self._reserve(prep)
            reserved = True
            self._wait_for_backlog(prep)
            peer, reply = self._find_decode(prep)
            if prep.aborted.is_set():
                self._cancel(peer, prep, "aborted while preparing")
                raise PrepareFailed("aborted")
            prep.prepared_at = time.time()
            self.hooks.admit(prep, peer, reply)
            reserved = False  # the scheduler owns the blocks now
        except PrepareFailed as exc:
            if not prep.aborted.is_set():
                self.hooks.fail(prep.msg, str(exc), True)
        except Exception as exc:  # a bug must not kill the pool thread or leak the blocks
            log.exception("preparing %s failed", rid)
            self.hooks.fail(prep.msg, f"internal error while preparing: {exc}")
        finally:
            if reserved:
                self.hooks.unreserve(rid)
            with self._lock:
                self._active.pop(rid, None)

    def _reserve(self, prep: Preparation) -> None:
        """(a) P's blocks; when P is full, wait (bounded) for blocks to be freed."""
        deadline = time.monotonic() + self.reserve_timeout_s
        with self.progress:
            while not self.hooks.reserve(prep.request):
                left = deadline - time.monotonic()
                if prep.aborted.is_set():
                    raise PrepareFailed("aborted")
                if left <= 0:
                    raise PrepareFailed("prefill instance has no free KV blocks (timed out)")
                self.progress.wait(min(left, 1.0))

    def _wait_for_backlog(self, prep: Preparation) -> None:
        """Ask D for blocks only when P will start this prompt soon: D's lease on them must
        cover P's queue, so a long queue here would waste D's memory and expire leases."""
        deadline = time.monotonic() + self.reserve_timeout_s
        with self.progress:
            while not self.hooks.backlog_ok():
                left = deadline - time.monotonic()
                if prep.aborted.is_set():
                    raise PrepareFailed("aborted")
                if left <= 0:
                    raise PrepareFailed("prefill instance is overloaded (queue did not drain)")
                self.progress.wait(min(left, 1.0))

    def _find_decode(self, prep: Preparation) -> tuple[DecodePeer, DecodeAllocation]:
        """(b) + (c): ask decode instances in turn until one allocates."""
        tried: set[InstanceId] = set()
        needed = -(-(prep.request.num_prompt_tokens + 1) // self._block_size())
        reasons = []
        for _ in range(self.config.max_decode_attempts):
            if prep.aborted.is_set():
                raise PrepareFailed("aborted")
            hint = prep.msg.decode_hint if not tried else None
            peer = self.picker.choose(needed, exclude=tried, prefer=hint)
            if peer is None:
                break
            tried.add(peer.name)
            reply = self._ask(prep, peer)
            if reply is not None and reply.accepted:
                return peer, reply
            reasons.append(f"{peer.name}: {reply.reason if reply else 'no answer in time'}")
        raise PrepareFailed(
            "no decode instance could take the request (" + "; ".join(reasons) + ")"
        )

    def _ask(self, prep: Preparation, peer: DecodePeer) -> DecodeAllocation | None:
        rid = prep.request.request_id
        with self._lock:
            prep.reply = None
            prep.replied.clear()
            prep.waiting_on = peer.name
        task = DecodeTask(
            request_id=rid,
            prompt_token_ids=prep.request.prompt_token_ids,
            sampling=prep.request.sampling_params,
            eos_token_ids=list(self.hooks.eos_token_ids),
            reply_to=self.hooks.inbox,
            router_inbox=prep.msg.reply_to,
            attempt=prep.msg.attempt,
            reuse_prefix=prep.msg.reuse_decode_prefix,
        )
        try:
            self.senders.send(peer.inbox, task)
        except ChannelError:
            self.picker.on_timeout(peer.name)
            return None
        answered = prep.replied.wait(self.config.allocation_timeout_s)
        with self._lock:
            prep.waiting_on = None
            reply = prep.reply
        if not answered:
            self.picker.on_timeout(peer.name)
            self._cancel(peer, prep, "allocation reply timed out")  # in case it arrives later
            return None
        if reply is None:  # woken by an abort
            self._cancel(peer, prep, "aborted while preparing")
        return reply

    def _cancel(self, peer: DecodePeer, prep: Preparation, reason: str) -> None:
        # Sent on this thread's socket to D, after the DecodeTask, so D sees them in order.
        cancel = CancelDecode(prep.request.request_id, reason, prep.msg.attempt)
        with contextlib.suppress(ChannelError):  # D is gone; its lease frees the blocks
            self.senders.send(peer.inbox, cancel)

    def _block_size(self) -> int:
        return self.config.engine.scheduler.block_size


def cache_task_for(
    prep: Preparation, peer: DecodePeer, reply: DecodeAllocation, lease_s: float
) -> CacheTask:
    """(d): which of P's blocks go to which of D's, for the messager. Writes must start before
    D's lease on the blocks can run out (D started it before its reply reached us)."""
    src = list(prep.request.block_ids)
    return CacheTask(
        request_id=prep.request.request_id,
        decode_instance=peer.name,
        decode_inbox=peer.inbox,
        src_block_ids=src,
        dst_block_ids=list(reply.block_ids[: len(src)]),
        num_prompt_tokens=prep.request.num_prompt_tokens,
        write_deadline=time.time() + lease_s - max(2.0, 0.2 * lease_s),
        attempt=prep.msg.attempt,
        skip_blocks=reply.cached_blocks,
    )
