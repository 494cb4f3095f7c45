"""The mixed and decode roles of the instance loop (the prefill role is in prefill_role.py).

Mixed: prefill and decode in one engine, classic continuous batching; the colocated baseline.
Decode: answers P's splitwise tasks at once with an allocation held under a lease, starts a
request when the messager's KvComplete says its KV is in, decodes. Blocks whose KV may still be
in flight are freed only on KvComplete (sent after every write finished or failed) or when the
lease expires, never on an abort.
"""

from __future__ import annotations

import time
from typing import Any

from cache_transfer.factory import (
    KVStore,
    attach_ranks,
    kv_agent_name,
    make_backend,
    make_shared_kv,
    rank_kv_wire,
    regions_of_tensors,
)
from cache_transfer.tp_layout import HeadRange, RankKV
from cluster.config import PdserveConfig
from cluster.deployment import deployment_id
from cluster.instances.loop import Client, RolePolicy
from cluster.tp_ranks import ray_ranks_for
from engine.config import Role
from engine.outputs import TokenDelta
from engine.protocol.cache import KvComplete
from engine.protocol.identity import InstanceId
from engine.protocol.requests import GenerateRequest
from engine.protocol.splitwise import CancelDecode, DecodeAllocation, DecodeTask
from engine.protocol.tokens import Timings
from engine.request import Request, RequestStatus
from worker.engine_core import EngineCore, kv_layout_for, resolve_device, resolve_overlap


def kv_prefix(name: InstanceId) -> str:
    """What names an instance's shared KV stores (ranks 1.. add "-rank<r>")."""
    return f"pdserve-{deployment_id()}-{name}"


def shared_kv(config: PdserveConfig, role: Role, name: InstanceId) -> KVStore:
    """Rank 0's KV cache where another process can map it (P's messager; with the local
    backend, the messager that writes into D)."""
    layout, dtype = kv_layout_for(config.model, getattr(config, role.value).engine)
    return make_shared_kv(layout, dtype, resolve_device(config.model), kv_prefix(name))


def role_overlap(config: PdserveConfig, role: Role) -> bool:
    """Whether `role`'s steps run under the overlap schedule (prefill has none)."""
    if role is Role.PREFILL:
        return False
    return resolve_overlap(getattr(config, role.value).overlap_schedule, config.model)


def build_core(
    config: PdserveConfig, role: Role, name: InstanceId, store: KVStore | None = None, **extra
) -> EngineCore:
    """The engine of a `role` instance from its config section (at TP > 1 its ranks are Ray
    actors inside a deployment, local processes outside one). With `store` rank 0 computes in
    it; prefill and decode ranks 1.. always keep their caches where this process can map and
    register them (their KV moves between instances)."""
    section = getattr(config, role.value)
    if store is not None:
        extra["kv_tensors"] = store.layer_tensors()
    if role is not Role.MIXED:
        extra["rank_kv_store"] = (make_shared_kv, kv_prefix(name))
    return EngineCore(
        config.model,
        section.engine,
        role,
        overlap=role_overlap(config, role),
        tp_ranks=ray_ranks_for(section.placement, section.engine, str(name)),
        defer_warmup=True,  # the loop thread runs it (InstanceLoop._run)
        **extra,
    )


class MixedRole(RolePolicy):
    role = Role.MIXED
    accepts = (GenerateRequest,)

    def __init__(self, config: PdserveConfig) -> None:
        self.scheduler = config.mixed.engine.scheduler
        self.overlap = role_overlap(config, Role.MIXED)

    def handle(self, msg: GenerateRequest) -> None:
        request = self.loop.new_request(msg)
        if request is not None:
            self.loop.core.add_request(request)

    # No `stamps`: the router's TTFT split has no phase for a mixed instance's step.


class DecodeRole(RolePolicy):
    role = Role.DECODE
    accepts = (DecodeTask, CancelDecode, KvComplete)

    def __init__(
        self,
        name: InstanceId,
        config: PdserveConfig,
        core: EngineCore,
        host: str,
        store: KVStore | None = None,
        owns_store: bool = True,
    ) -> None:
        """`store`: where rank 0's cache lives when another process may map it (with the
        local backend; on a switchable instance, its prefill role's store, which that role
        closes)."""
        self.name = name
        self.scheduler = config.decode.engine.scheduler
        self.overlap = role_overlap(config, Role.DECODE)
        self.own_store = store if owns_store else None
        self.lease_s = config.decode.kv_lease_timeout_s
        self.backend = make_backend(config.transfer.backend, kv_agent_name(name), host)
        # Every rank's cache, so P's messager writes each head slice where its rank reads it.
        heads = core.kv_head_ranges
        if len(heads) > 1 and core.runner.device.type == "cuda":
            raise RuntimeError(
                "decode.engine.tensor_parallel_size > 1 on a GPU: this process cannot map its "
                "other ranks' GPU caches (served on CPU only for now)"
            )
        own = RankKV(regions_of_tensors(core.runner.kv_cache.layers), HeadRange(*heads[0]))
        self.rank_kvs, others = attach_ranks(rank_kv_wire(core.rank_kv_handles[1:], heads[1:]))
        self.backend.register([own, *others])
        if store is not None:  # a backend whose source maps D's cache itself takes the stores
            self.backend.share(rank_kv_wire([store.handle(), *core.rank_kv_handles[1:]], heads))
        # D's holds on blocks whose KV P is writing: request id -> since (monotonic). A lease
        # whose client is gone (aborted) still waits for KvComplete or expiry to free them.
        self.leases: dict[str, float] = {}

    def handle(self, msg: Any) -> None:
        if isinstance(msg, DecodeTask):
            self._on_task(msg)
        elif isinstance(msg, CancelDecode):
            if not self._end(msg.request_id, RequestStatus.FINISHED_ABORTED):
                self.loop.counters["unknown_request_messages"] += 1
        elif isinstance(msg, KvComplete):
            self._on_kv_complete(msg)

    def _on_task(self, task: DecodeTask) -> None:
        loop = self.loop
        request = Request(
            task.request_id,
            task.prompt_token_ids,
            task.sampling,
            eos_token_ids=tuple(task.eos_token_ids),
        )
        reason = "no free blocks or sequence slots"
        try:
            accepted = task.request_id not in loop.clients and (
                loop.core.scheduler.reserve_remote(request, reuse_prefix=task.reuse_prefix)
            )
        except ValueError as exc:  # a prompt longer than this instance's context
            accepted, reason = False, str(exc)
        if accepted:
            self.leases[task.request_id] = time.monotonic()
            loop.clients[task.request_id] = Client(task.router_inbox)
        reply = DecodeAllocation(
            task.request_id,
            self.name,
            accepted,
            list(request.block_ids) if accepted else [],
            "" if accepted else reason,
            loop.core.block_manager.num_free_blocks,
            cached_blocks=request.num_cached_tokens // loop.core.block_manager.block_size,
        )
        loop.counters["allocations_accepted" if accepted else "allocations_refused"] += 1
        if not loop.send(task.reply_to, reply, "allocation_send_failures") and accepted:
            self._end(task.request_id, RequestStatus.FINISHED_ERROR)  # P will never send KV

    def _on_kv_complete(self, msg: KvComplete) -> None:
        loop = self.loop
        if self.leases.pop(msg.request_id, None) is None:
            loop.counters["unknown_request_messages"] += 1
            return
        if not msg.ok or msg.request_id not in loop.clients:  # failed, or the client left
            error = f"KV transfer failed: {msg.error or 'aborted'}"
            self._fail_lease(msg.request_id, error, msg.client_informed)
            return
        loop.counters["kv_complete"] += 1
        loop.clients[msg.request_id].timings = Timings(
            kv_signalled=msg.signalled_time,
            writes_done=msg.writes_done_time,
            kv_complete=time.time(),
        )
        delta = loop.core.scheduler.start_remote(msg.request_id, msg.first_token_id)
        if delta is not None and delta.finished:
            loop.publish([delta])

    def drop(self, request_id: str, status: RequestStatus, reason: str) -> bool:
        if request_id in self.leases:  # KV may be in flight: free on KvComplete or lease expiry
            return True
        return self.loop.core.abort_request(request_id, status)

    def _end(self, request_id: str, status: RequestStatus) -> bool:
        """Free a request's blocks now (P has stopped writing) and forget it silently."""
        self.leases.pop(request_id, None)
        self.loop.clients.pop(request_id, None)
        return self.loop.core.abort_request(request_id, status)

    def _fail_lease(self, request_id: str, error: str, client_informed: bool = False) -> None:
        """The KV will not arrive, or its client left: free the blocks now (P has stopped
        writing) and tell the client, unless it already heard why."""
        self.leases.pop(request_id, None)
        self.loop.core.abort_request(request_id, RequestStatus.FINISHED_ERROR)
        if client_informed:
            self.loop.clients.pop(request_id, None)
        self.loop.fail_client(request_id, error)

    def stamps(self, delta: TokenDelta, client: Client, now: float) -> Timings | None:
        if delta.first_index != 1:  # only the first token D computed carries the transfer's
            return None
        client.timings.first_decode_step = now
        return client.timings

    def tick(self) -> None:
        now = time.monotonic()
        expired = [rid for rid, since in self.leases.items() if now - since > self.lease_s]
        for rid in expired:
            self.loop.counters["leases_expired"] += 1
            self._fail_lease(rid, f"KV did not arrive within {self.lease_s:.0f} s")

    def in_flight(self) -> int:
        return len(self.leases)

    def movable(self) -> list[str]:
        """Decoding requests move on (the router migrates them); those whose KV may still be
        arriving wait for KvComplete or their lease (and move then)."""
        return [rid for rid in self.loop.core.scheduler.requests if rid not in self.leases]

    def info(self) -> dict:
        return {
            "transfer": self.backend.endpoint_info(),
            "num_blocks": self.loop.core.block_manager.num_blocks,
        }

    def stats(self) -> dict:
        waiting = self.loop.core.scheduler.num_with_status(RequestStatus.WAITING_FOR_KV)
        return {"waiting_for_kv": waiting, "transfer": self.backend.stats()}

    def close(self) -> None:
        self.backend.close()
        for kv in self.rank_kvs:
            kv.close()
        if self.own_store is not None:
            self.own_store.close()  # the owner's close also unlinks a shared-memory segment
