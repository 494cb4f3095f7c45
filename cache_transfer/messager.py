"""Cache messager actor: maps its prefill instance's KV cache and streams it to decode instances.

It runs in its own process beside P (same node, same placement-group bundle). It maps P's KV
cache -- POSIX shared memory on CPU, P's device memory over CUDA IPC on a GPU -- registers it
with its own transfer agent (NIXL by default) and WRITEs blocks straight from it into D's
registered cache, layer by layer while P computes later layers.

Completion goes to D as a `KvComplete` message on D's inbox, sent only after every write of the
request polled DONE (which, per the backend contract, means the bytes are in D's memory). A zmq
message lets D block on its inbox instead of polling NIXL's notification list.

The loop blocks on its inbox; while writes are in flight it wakes every `_BUSY_POLL_S` to poll
their state, because NIXL offers no completion handle to block on.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from cache_transfer.backend import deadline_in
from cache_transfer.factory import attach_shared_kv, make_backend
from cache_transfer.messager_state import MessagerState, Outcome
from engine.procinfo import rss_mb
from engine.protocol.cache import (
    CacheTask,
    CancelCache,
    KvComplete,
    LayerReady,
    PrefillDone,
    StepPlan,
    TransferDone,
)
from engine.protocol.channels import ChannelError, Inbox, SenderPool, node_ip_address
from engine.protocol.identity import InstanceId, MessagerId

log = logging.getLogger(__name__)

_BUSY_POLL_S = 0.0005
_IDLE_WAIT_S = 0.5


class CacheMessager:
    def __init__(self, name: MessagerId, backend: str, task_wait_s: float) -> None:
        self.name = name
        self.backend_name = backend
        self.task_wait_s = task_wait_s
        self._peers: dict[InstanceId, str] = {}  # decode instance -> backend peer name
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def setup(self, host: str | None, kv_handle: dict, prefill_inbox: str) -> dict:
        """Map P's KV cache (its shared KV store's `handle()`), register it, start the loop. Called
        again after this actor or its prefill instance restarted."""
        if getattr(self, "_thread", None) is not None:
            self.shutdown()  # re-attaching to a restarted prefill instance: start clean
        self._stop = threading.Event()
        self._peers = {}
        self.host = host or node_ip_address()
        self.prefill_inbox = prefill_inbox
        self.kv = attach_shared_kv(kv_handle)
        regions = self.kv.regions()
        self.backend = make_backend(self.backend_name, f"{self.name}-kv", self.host)
        self.backend.register(regions)
        self.state = MessagerState(
            self.backend,
            regions.layout.num_layers,
            regions.layout.block_size,
            self._resolve_peer,
            self.task_wait_s,
        )
        self.senders = SenderPool()
        accept = (CacheTask, StepPlan, LayerReady, PrefillDone, CancelCache)
        self.inbox = Inbox(self.host, accept=accept, name=str(self.name))
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return {"name": self.name, "inbox": self.inbox.address}

    def add_decode_peers(self, decodes: list[dict], timeout_s: float = 30.0) -> None:
        """Connect to decode instances' transfer endpoints (again, if one restarted)."""
        for decode in decodes:
            peer = self.backend.connect(decode["transfer"], deadline_in(timeout_s))
            with self._lock:
                self._peers[decode["name"]] = peer

    def decode_down(self, decode_name: InstanceId) -> None:
        """A decode instance died: its pending writes fail, its tasks end (P hears of each)."""
        with self._lock:
            peer = self._peers.pop(decode_name, None)
        if peer is not None:
            self.backend.disconnect(peer)

    def _resolve_peer(self, decode_name: InstanceId) -> str | None:
        with self._lock:
            return self._peers.get(decode_name)

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        while not self._stop.is_set():
            timeout = _BUSY_POLL_S if self.state.busy else _IDLE_WAIT_S
            msg = self.inbox.recv(timeout_s=timeout)
            try:
                if msg is not None:
                    self._handle(msg)
                    for msg in self.inbox.drain():
                        self._handle(msg)
                for outcome in self.state.poll():
                    self._report(outcome)
            except Exception:  # keep streaming other requests; the failed ones time out on P
                log.exception("cache messager %s: loop error", self.name)

    def _handle(self, msg) -> None:
        state = self.state
        if isinstance(msg, LayerReady):
            state.layer_ready(msg.step_id, msg.layer)
        elif isinstance(msg, StepPlan):
            state.add_plan(msg.step_id, msg.chunks)
        elif isinstance(msg, CacheTask):
            state.add_task(msg)
        elif isinstance(msg, PrefillDone):
            state.prefill_done(msg.request_id, msg.first_token_id, time.time())
        elif isinstance(msg, CancelCache) and not state.cancel(
            msg.request_id, msg.reason, msg.client_informed
        ):
            # Unknown here: P still waits for an answer before it frees its blocks.
            self._send(self.prefill_inbox, TransferDone(msg.request_id, False, msg.reason))

    def _report(self, outcome: Outcome) -> None:
        st = outcome.state
        done = KvComplete(
            st.request_id,
            outcome.ok,
            st.first_token_id if st.first_token_id is not None else -1,
            outcome.error,
            client_informed=st.client_informed,
            signalled_time=max(st.prefill_done_wall, st.all_issued_wall),
            writes_done_time=st.writes_done_wall,
            attempt=st.task.attempt,
        )
        self._send(st.task.decode_inbox, done)
        self._send(
            self.prefill_inbox,
            TransferDone(st.request_id, outcome.ok, outcome.error, st.nbytes, outcome.seconds),
        )

    def _send(self, address: str, msg) -> None:
        try:
            self.senders.send(address, msg)
        except ChannelError:
            log.warning("cache messager %s: could not reach %s", self.name, address)

    # ------------------------------------------------------------------ inspection
    def is_ready(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> dict:
        return {
            "name": str(self.name),
            "pid": os.getpid(),
            "rss_mb": rss_mb(),
            "inbox": self.inbox.address,
            "tasks": len(self.state.tasks),
            "deferred": len(self.state.deferred),
            "plans": len(self.state.plans),
            "counters": dict(self.state.counters),
            "transfer": self.backend.stats(),
            "bad_frames": self.inbox.bad_frames,
        }

    def shutdown(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        self.inbox.close()
        self.senders.close()
        self.backend.close()
        self.kv.close()
