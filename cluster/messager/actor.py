"""Cache messager actor: maps its prefill instance's KV cache and streams it to decode instances.

It runs beside P (same node, same placement-group bundle), maps P's KV cache -- every
tensor-parallel rank's (POSIX shared memory on CPU, CUDA IPC on a GPU) -- registers it with its
own transfer agent and WRITEs blocks straight into D's registered cache, layer by layer while P
computes later layers. Between instances of different tensor-parallel sizes each D rank's heads
are gathered from the P ranks holding them into a staging ring laid out as D's blocks and
written whole (cache_transfer/staging.py); at equal sizes rank r's blocks go whole to D's rank r.
`KvComplete` goes to D's inbox only after every write of the request polled DONE (the bytes are
in D's memory), so D blocks on its inbox instead of polling NIXL's notification list.

One loop owns `MessagerState`; it blocks on its inbox, but wakes every `_BUSY_POLL_S` while
writes are in flight (NIXL has no completion handle to block on). Each message and each outcome
is handled under its own guard: a failure fails its request only (D hears `KvComplete(ok=False)`,
P `TransferDone(ok=False)`). Ray's method threads touch only the backend (thread-safe by
contract), never the state.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from cache_transfer.backend import deadline_in
from cache_transfer.factory import attach_ranks, kv_agent_name, make_backend
from cache_transfer.staging import StagedWriter
from cluster.messager.state import MessagerState, TaskState
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
from engine.protocol.channels import Inbox, SenderPool, node_ip_address
from engine.protocol.identity import InstanceId, MessagerId

log = logging.getLogger(__name__)

_BUSY_POLL_S = 0.0005
_IDLE_WAIT_S = 0.5
_ACCEPTS = (CacheTask, StepPlan, LayerReady, PrefillDone, CancelCache)


class CacheMessager:
    def __init__(
        self, name: MessagerId, backend: str, task_wait_s: float, staging_mb: int = 64
    ) -> None:
        self.name = name
        self.backend_name = backend
        self.task_wait_s = task_wait_s
        self.staging_bytes = staging_mb << 20
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._heartbeat = time.monotonic()

    def setup(self, host: str | None, kv_ranks: list[dict], prefill_inbox: str) -> dict:
        """Map P's KV cache (every rank's store, `rank_kv_wire`), register it, start the loop.
        Called again after this actor or its prefill instance restarted."""
        if self._thread is not None:
            self.shutdown()  # re-attaching to a restarted prefill instance: start clean
        self._stop = threading.Event()
        host = host or node_ip_address()
        self.kvs, ranks = attach_ranks(kv_ranks)
        backend = make_backend(self.backend_name, kv_agent_name(self.name), host)
        backend.register(ranks)
        tensors = [kv.layer_tensors() for kv in self.kvs]  # gathers between different TP sizes
        self.backend = StagedWriter(backend, tensors, self.staging_bytes)
        self._connected: dict[str, dict] = {}  # decode name -> transfer endpoint connected
        layout = ranks[0].regions.layout
        state = MessagerState(
            self.backend, layout.num_layers, layout.block_size, kv_agent_name, self.task_wait_s
        )
        self.open(state, host, prefill_inbox)
        self._thread = threading.Thread(target=self._run, name=str(self.name), daemon=True)
        self._heartbeat = time.monotonic()
        self._thread.start()
        return {"name": self.name, "inbox": self.inbox.address}

    def open(self, state: MessagerState, host: str, prefill_inbox: str) -> None:
        """Bind the inbox and take `state`; the loop's rounds (`round()`) may start."""
        self.state = state
        self.prefill_inbox = prefill_inbox
        self.senders = SenderPool()
        self.inbox = Inbox(host, accept=_ACCEPTS, name=str(self.name))

    def add_decode_peers(
        self, decodes: list[dict], timeout_s: float = 30.0, only_new: bool = False
    ) -> None:
        """Connect to decode instances' transfer endpoints (again, if one restarted).
        `only_new`: skip those connected already with the same endpoint (a role switch
        re-announces every decode instance; reconnecting would drop writes in flight)."""
        for decode in decodes:
            info = decode["transfer"]
            if only_new and self._connected.get(str(decode["name"])) == info:
                continue
            self.backend.connect(info, deadline_in(timeout_s))
            self._connected[str(decode["name"])] = info

    def decode_down(self, decode: InstanceId) -> None:
        """A decode instance died: its pending writes fail, so its tasks end (P hears of each)."""
        self.backend.disconnect(kv_agent_name(decode))

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        while not self._stop.is_set():
            self.round()

    def round(self) -> None:
        """One turn of the loop: wait for messages (briefly while writes are in flight), apply
        them, report the tasks that finished."""
        self._heartbeat = time.monotonic()
        timeout = _BUSY_POLL_S if self.state.busy else _IDLE_WAIT_S
        msg = self.inbox.recv(timeout_s=timeout)
        if msg is not None:
            for each in [msg, *self.inbox.drain()]:
                self._apply(each)
        for finished in self.state.poll():
            self._report(finished)

    def _apply(self, msg: Any) -> None:
        """Handle one message; if that fails, fail its request (if it names one), nothing else."""
        try:
            self._handle(msg)
        except Exception as exc:
            log.exception("cache messager %s: could not handle %s", self.name, type(msg).__name__)
            self.state.counters["bad_messages"] += 1
            self._fail(msg, f"cache messager could not handle {type(msg).__name__}: {exc}")

    def _handle(self, msg: Any) -> None:
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

    def _fail(self, msg: Any, error: str) -> None:
        request_id = getattr(msg, "request_id", None)
        if request_id is None or self.state.cancel(request_id, error):
            return  # a step's signal (its requests fail one by one), or reported once drained
        if isinstance(msg, CacheTask):  # never became a task: nothing was written
            failed = KvComplete(request_id, False, error=error)
            self._send(msg.decode_inbox, failed)
        self._send(self.prefill_inbox, TransferDone(request_id, False, error))

    def _report(self, st: TaskState) -> None:
        rid, ok = st.request_id, not st.failure
        done = KvComplete(
            rid,
            ok,
            st.first_token_id,
            st.failure,
            signalled_time=max(st.prefill_done_wall, st.all_issued_wall),
            writes_done_time=st.writes_done_wall,
            client_informed=st.client_informed,
        )
        self._send(st.task.decode_inbox, done)
        seconds = time.monotonic() - st.created
        self._send(self.prefill_inbox, TransferDone(rid, ok, st.failure, st.nbytes, seconds))

    def _send(self, address: str, msg: Any) -> None:
        try:
            self.senders.send(address, msg)
        except Exception as exc:  # that peer's loss; every other request's reports go on
            log.warning("cache messager %s: could not tell %s: %s", self.name, address, exc)

    # ------------------------------------------------------------------ inspection
    def is_ready(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def heartbeat_age_s(self) -> float | None:
        """Seconds since the loop last went round (at least every 0.5 s); None before setup()."""
        return None if self._thread is None else time.monotonic() - self._heartbeat

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
            "heartbeat_age_s": self.heartbeat_age_s(),
        }

    def shutdown(self) -> None:
        self._stop.set()
        if self._thread is None:
            return  # never set up: nothing is open
        self._thread.join(5)
        self._thread = None
        self.inbox.close()
        self.senders.close()
        self.backend.close()
        for kv in self.kvs:
            kv.close()
