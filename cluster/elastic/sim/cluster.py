"""A simulated PD deployment: router, prepare, prefill, KV transfer and decode on an event clock.

What runs for real: the router's choice of a prefill instance (`cluster/router/routing.py`), each
prefill instance's choice of a decode instance (`DecodePicker`), and every instance's engine
`Scheduler` and `BlockManager`. What is modelled: step times (`CostModel`), the prepare delay,
the KV transfer's tail after the first token, and network hops (none). The path of a request
follows docs/architecture.md: the router sends it to the P with the fewest outstanding prefill
tokens; P waits for its backlog to be short, reserves its blocks, asks decode instances in turn
(at most `prefill.max_decode_attempts`; when all refuse, the request fails as it does for real),
prefills, sends the first token, and D starts decoding when the KV is complete.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from cluster.bench.client import RequestRecord
from cluster.config import PdserveConfig, RoutingMode
from cluster.elastic.sim.clock import EventClock
from cluster.elastic.sim.cost import CostModel
from cluster.elastic.sim.instance import (
    TOKEN,
    SimInstance,
    SimRequest,
    engine_request,
    real_tokens_out,
    sim_lengths,
)
from cluster.elastic.sim.workload import TraceRequest
from cluster.elastic.slo_window import SloWindow
from cluster.instances.decode_picker import DecodePeer, DecodePicker
from cluster.router.routing import BalanceGuard, PrefillCandidate, RoutingPolicy
from engine.batch import ModelRunnerOutput, SchedulerOutput
from engine.config import Role
from engine.outputs import TokenDelta
from engine.request import RequestStatus

PREPARE_TIMEOUT_S = 30.0  # the prepare pool's reserve_timeout_s: a request queued longer fails


@dataclass(frozen=True)
class SimSettings:
    quantum: int = 1  # real tokens per simulated token (see instance.py)
    switch_s: float = 1.0  # drained -> serving in the new role (re-announce, re-wire)
    startup_s: float = 30.0  # a restarted or added instance: start-up to serving
    restart_failed: bool = True  # Ray restarts a crashed instance in its role
    max_concurrency: int | None = None  # client-side limit, as `pdserve bench` has it


class SimCluster:
    def __init__(
        self,
        config: PdserveConfig,
        cost: CostModel,
        layout: dict[Role, int],
        settings: SimSettings,
    ) -> None:
        self.config = config
        self.cost = cost
        self.settings = settings
        self.clock = EventClock()
        self.window = SloWindow(config.slo.ttft_ms, config.slo.tpot_ms, config.slo.window_s)
        self.instances: dict[str, SimInstance] = {}
        self.outstanding: dict[str, int] = {}  # the router's count, by prefill/mixed instance
        self.pickers: dict[str, DecodePicker] = {}  # each P's own picker, as for real
        self.requests: list[SimRequest] = []
        self.unfinished = 0
        self._takers: list[str] = []
        self.finished_log: list[tuple[float, bool]] = []  # (time, met the SLO)
        self.on_finish: list[Callable[[SimRequest], None]] = []
        self.on_idle: list[Callable[[SimInstance], None]] = []  # an instance ran out of work
        guard = config.router.cache_routing
        self.routing = RoutingPolicy(
            config.router.routing == RoutingMode.CACHE_AWARE,
            prefill_guard=BalanceGuard(guard.max_load_ratio, guard.prefill_slack_tokens),
            decode_guard=BalanceGuard(guard.max_load_ratio, guard.decode_slack_requests),
        )
        self._client_queue: deque[SimRequest] = deque()
        self._inflight = 0
        for role, count in layout.items():
            for _ in range(count):
                self.add_instance(role)
        self.endpoints_changed()

    # ------------------------------------------------------------------ set-up
    def add_instance(self, role: Role) -> SimInstance:
        name = f"i{len(self.instances)}"
        sections = {Role.PREFILL: "prefill", Role.DECODE: "decode", Role.MIXED: "mixed"}
        configs = {r: getattr(self.config, s).engine.scheduler for r, s in sections.items()}
        inst = SimInstance(
            name,
            role,
            configs,
            self._num_blocks(role),
            self.cost,
            self.settings.quantum,
            self._max_model_len(),
        )
        self.instances[name] = inst
        return inst

    def _num_blocks(self, role: Role) -> int:
        section = {Role.PREFILL: "prefill", Role.DECODE: "decode", Role.MIXED: "mixed"}[role]
        engine = getattr(self.config, section).engine
        if engine.cache.num_blocks is not None:
            return engine.cache.num_blocks
        block_bytes = self.cost.kv_bytes_per_token * engine.scheduler.block_size
        return max(1, engine.cache.memory_mb * 2**20 // block_bytes)

    def _max_model_len(self) -> int:
        return self.config.decode.engine.scheduler.max_model_len or 131072

    def load(self, trace: list[TraceRequest]) -> None:
        k = self.settings.quantum
        for t in trace:
            prompt, output = sim_lengths(t.prompt_tokens, t.output_tokens, k)
            request = SimRequest(
                t.index, t.arrival_s, t.prompt_tokens, t.output_tokens, prompt, output
            )
            self.requests.append(request)
            self.unfinished += 1
            self.clock.at(t.arrival_s, lambda r=request: self._arrive(r))

    def endpoints_changed(self) -> None:
        """Roles or membership changed: the router and every P's picker see the new set."""
        decodes = [i for i in self.serving(Role.DECODE)]
        peers = [
            DecodePeer(d.name, d.name, d.block_manager.num_blocks, d.block_manager.num_free_blocks)
            for d in decodes
        ]
        for inst in self.serving(Role.PREFILL):
            picker = self.pickers.setdefault(inst.name, DecodePicker([], 1.0, 0.25))
            picker.set_peers(peers)
        for inst in self.instances.values():
            if inst.alive and inst.role in (Role.PREFILL, Role.MIXED):
                self.outstanding.setdefault(inst.name, 0)
        # What the router may send requests to (every change of membership comes through here).
        self._takers = [i.name for i in self.serving(Role.PREFILL) + self.serving(Role.MIXED)]

    def serving(self, role: Role) -> list[SimInstance]:
        return [i for i in self.instances.values() if i.alive and i.accepting and i.role is role]

    # ------------------------------------------------------------------ the router
    def _arrive(self, request: SimRequest) -> None:
        limit = self.settings.max_concurrency
        if limit is not None and self._inflight >= limit:
            self._client_queue.append(request)
            return
        self._inflight += 1
        request.sent_s = self.clock.now
        self._send(request)

    def _send(self, request: SimRequest) -> None:
        names = self._takers
        if not names:
            self._fail(request, "no prefill or mixed instance")
            return
        # No prefix cache in the simulator: every candidate holds nothing of the prompt.
        candidates = [PrefillCandidate(n, self.outstanding[n]) for n in names]
        name = self.routing.choose_prefill(candidates, request.prompt_tokens).name
        self.outstanding[name] += request.prompt_tokens
        request.prefill = name
        inst = self.instances[name]
        self.clock.after(self.cost.prepare_s, lambda: self._admit(inst, request))

    def _first_token(self, request: SimRequest) -> None:
        request.first_token_s = request.last_token_s = self.clock.now
        request.sim_out = 1
        if request.prefill in self.outstanding:
            self.outstanding[request.prefill] -= request.prompt_tokens

    def _finish(self, request: SimRequest, error: str = "") -> None:
        if request.finished:
            return
        request.finished = True
        request.error = error
        self.unfinished -= 1
        now = self.clock.now
        if error:
            if request.first_token_s is None and request.prefill in self.outstanding:
                self.outstanding[request.prefill] -= request.prompt_tokens
            self.window.record_failure(now)
        else:
            record = self.record(request)
            self.window.record(now, record.ttft_s, record.tpot_s)
        for hook in self.on_finish:
            hook(request)
        self._inflight -= 1
        if self._client_queue:
            self._arrive(self._client_queue.popleft())

    def _fail(self, request: SimRequest, error: str) -> None:
        self._drop_everywhere(request)
        self._finish(request, error)

    # ------------------------------------------------------------------ prefill side
    def _admit(self, inst: SimInstance, request: SimRequest) -> None:
        if request.finished:
            return
        if not inst.alive:
            self._retry(request)
            return
        if inst.role is Role.MIXED:
            er = engine_request(request, request.sim_prompt, request.sim_output)
            inst.scheduler.add_request(er)
            inst.tracked[er.request_id] = request
            self.kick(inst)
            return
        inst.prepare_queue.append(request)
        self.prepare(inst)

    def prepare(self, p: SimInstance) -> None:
        """P's prepare pool, in arrival order: backlog short enough, P's blocks, then a D."""
        limit = self.config.prefill.max_backlog_tokens
        while p.prepare_queue and p.alive:
            request = p.prepare_queue[0]
            if self.clock.now - request.sent_s > PREPARE_TIMEOUT_S:
                p.prepare_queue.popleft()
                self._finish(request, "prefill instance is overloaded (queue did not drain)")
                continue
            if p.queued_prompt_tokens() >= limit:
                break
            er = engine_request(request, request.sim_prompt, request.sim_output)
            if not p.scheduler.reserve_prefill(er):
                break
            p.prepare_queue.popleft()
            d = self._reserve_decode(p, request)
            if d is None:
                p.scheduler.abort_request(er.request_id)
                self._finish(request, "no decode instance could take the request")
                continue
            p.scheduler.add_request(er)
            p.tracked[er.request_id] = request
            request.decode = d.name
        self.kick(p)

    def _reserve_decode(self, p: SimInstance, request: SimRequest) -> SimInstance | None:
        picker = self.pickers[p.name]
        tried: set[str] = set()
        for _ in range(self.config.prefill.max_decode_attempts):
            peer = picker.choose(self._blocks_for(request), exclude=tried)
            if peer is None:
                return None
            tried.add(peer.name)
            d = self.instances[peer.name]
            er = engine_request(request, request.sim_prompt, request.sim_output)
            ok = d.alive and d.accepting and d.role is Role.DECODE
            ok = ok and d.scheduler.reserve_remote(er)
            picker.on_reply(peer.name, d.block_manager.num_free_blocks)
            if ok:
                d.tracked[er.request_id] = request
                return d
        return None

    def _blocks_for(self, request: SimRequest) -> int:
        block_size = next(iter(self.instances.values())).block_manager.block_size
        return -(-(request.sim_prompt + 1) // block_size)

    # ------------------------------------------------------------------ steps
    def kick(self, inst: SimInstance) -> None:
        """Start the instance's next step unless one is running or there is nothing to do."""
        if inst.stepping or not inst.alive:
            return
        if inst.scheduler.has_work():
            out = inst.scheduler.schedule()
            if not out.is_empty:
                seconds = inst.step_time(out)
                inst.stepping = True
                inst.busy_s += seconds
                inst.step_event = self.clock.after(seconds, lambda: self._step_done(inst, out))
                return
        for hook in self.on_idle:
            hook(inst)

    def _step_done(self, inst: SimInstance, out: SchedulerOutput) -> None:
        inst.stepping = False
        inst.step_event = None
        sampled = [TOKEN if c.sample else None for c in out.chunks]
        ids = [c.request_id for c in out.chunks]
        result = ModelRunnerOutput(out.step_id, ids, sampled)
        for delta in inst.scheduler.update_from_output(out, result):
            self._on_token(inst, delta)
        if inst.role is Role.PREFILL:
            self.prepare(inst)
        self.kick(inst)

    def _on_token(self, inst: SimInstance, delta: TokenDelta) -> None:
        request = inst.tracked.get(delta.request_id)
        if request is None:
            return
        if request.first_token_s is None:
            self._first_token(request)
        else:
            request.last_token_s = self.clock.now
            request.sim_out += 1
        if inst.role is Role.PREFILL:
            self._prefilled(inst, request, delta)
        elif delta.status.finished:
            inst.tracked.pop(delta.request_id, None)
            self._finish(request)

    def _prefilled(self, p: SimInstance, request: SimRequest, delta: TokenDelta) -> None:
        rid = delta.request_id
        if delta.status.finished:  # the first token was the last: cancel the transfer
            p.tracked.pop(rid, None)
            self._drop_everywhere(request)
            self._finish(request)
            return
        tail = self.cost.transfer_tail_s(request.prompt_tokens)
        self.clock.after(tail, lambda: self._kv_complete(p, request, rid))

    def _kv_complete(self, p: SimInstance, request: SimRequest, rid: str) -> None:
        if p.alive and p.tracked.pop(rid, None) is not None:
            p.scheduler.release_sent(rid, RequestStatus.FINISHED_STOPPED)
            self.prepare(p)
        d = self.instances.get(request.decode)
        if d is None or not d.alive or rid not in d.tracked:
            return
        d.scheduler.start_remote(rid, TOKEN)
        self.kick(d)

    # ------------------------------------------------------------------ failures
    def _drop_everywhere(self, request: SimRequest) -> None:
        """Free what any instance holds for the request (as aborts do for real)."""
        for name in {request.prefill, request.decode}:
            inst = self.instances.get(name)
            if inst is None:
                continue
            if request in inst.prepare_queue:
                inst.prepare_queue.remove(request)
            if inst.tracked.pop(request.engine_id, None) is not None and inst.alive:
                inst.scheduler.abort_request(request.engine_id)
                self.kick(inst)

    def _retry(self, request: SimRequest) -> None:
        """The router resends a request whose P died before its first token, under a new id."""
        self._drop_everywhere(request)
        if request.prefill in self.outstanding:
            self.outstanding[request.prefill] -= request.prompt_tokens
        request.attempt += 1
        request.decode = ""
        self._send(request)

    def kill(self, name: str) -> None:
        """The instance crashes: what it held is retried (never started) or failed."""
        inst = self.instances[name]
        if not inst.alive:
            return
        if inst.step_event is not None:
            self.clock.cancel(inst.step_event)
        affected = list(inst.tracked.values()) + list(inst.prepare_queue)
        inst.alive = False
        inst.stepping = False
        inst.tracked.clear()
        inst.prepare_queue.clear()
        self.outstanding.pop(name, None)
        self.endpoints_changed()
        for request in affected:
            if request.finished:
                continue
            if request.first_token_s is None and request.prefill == name:
                self._retry(request)
            else:
                self._fail(request, f"instance {name} failed while serving this request")
        if self.settings.restart_failed:
            self.clock.after(self.settings.startup_s, lambda: self._restart(inst))

    def _restart(self, inst: SimInstance) -> None:
        inst.reset()
        self.endpoints_changed()

    # ------------------------------------------------------------------ results
    def record(self, request: SimRequest) -> RequestRecord:
        ok = request.finished and not request.error
        record = RequestRecord(
            index=request.index,
            success=ok,
            error=request.error,
            start_s=request.sent_s,
            prompt_tokens=request.prompt_tokens,
            max_tokens=request.output_tokens,
        )
        if ok:
            record.ttft_s = request.first_token_s - request.sent_s
            record.e2e_s = request.last_token_s - request.sent_s
            record.output_tokens = real_tokens_out(
                request.sim_out, request.output_tokens, self.settings.quantum
            )
        return record
