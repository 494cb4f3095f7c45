"""The one loop of an instance: it alone touches the engine and the records of its requests.

Each iteration drains the inbox and the mailbox without blocking, lets the role check its
deadlines, runs one engine step and publishes its tokens; with nothing to run it blocks on both
(with a timeout, so deadlines still pass). Other threads never touch the state: Ray's method
threads post a closure and wait for its result (`call`), the prepare pool posts its answers. A
bad message or a bug while handling one ends that request only; a failing step ends that step's
requests only. What a role does differently lives in its policy (roles.py, prefill_role.py).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from cluster.instances.switch import RoleSwitch, advance_switch, refuse_misrouted
from engine.batch import SchedulerOutput
from engine.config import Role, SchedulerConfig
from engine.outputs import TokenDelta
from engine.prefix_events import CacheReporter
from engine.procinfo import rss_mb
from engine.protocol.channels import ChannelError, Inbox, Mailbox, SenderPool
from engine.protocol.identity import InstanceId
from engine.protocol.requests import AbortRequest, GenerateRequest
from engine.protocol.tokens import Timings, TokenBatch, TokenItem
from engine.request import Request, RequestStatus
from worker.engine_core import EngineCore
from worker.malloc_trim import MallocTrimmer

log = logging.getLogger(__name__)


@dataclass
class Client:
    """Where a request's tokens go (the router's inbox) and the stamps its items carry."""

    reply_to: str
    decode: InstanceId | None = None  # P: the decode instance that continues the request
    timings: Timings = field(default_factory=Timings)


class RolePolicy:
    """What a role adds to the loop; the defaults add nothing. Every hook runs on the loop."""

    role: Role
    accepts: tuple[type, ...] = ()  # inbox message types besides AbortRequest
    scheduler: SchedulerConfig  # the role's batching, which the scheduler takes on a switch
    overlap: bool = False  # whether the role's steps run under the overlap schedule
    loop: InstanceLoop

    def attach(self, loop: InstanceLoop) -> None:
        self.loop = loop

    def handle(self, msg: Any) -> None:
        """One message from the inbox or the mailbox (other than an abort)."""

    def drop(self, request_id: str, status: RequestStatus, reason: str) -> bool:
        """End a request wherever it is, freeing what can be freed now; False if unknown."""
        return self.loop.core.abort_request(request_id, status)

    def before_step(self, sched: SchedulerOutput) -> None:
        pass

    def stamps(self, delta: TokenDelta, client: Client, now: float) -> Timings | None:
        """The timing stamps the delta's item carries."""
        return None

    def after_delta(self, delta: TokenDelta) -> None:
        pass

    def tick(self) -> None:
        """Every iteration: deadlines."""

    def ready(self) -> bool:
        return True

    def info(self) -> dict:
        """Role-specific parts of setup()'s answer."""
        return {}

    def stats(self) -> dict:
        return {}

    def in_flight(self) -> int:
        """Requests this role holds outside the scheduler (leases, preparations, transfers);
        a role switch waits until there are none."""
        return 0

    def movable(self) -> list[str]:
        """A role switch's drain deadline passed: the requests that can leave now (ended with
        an error, so that the router moves them to other instances: migration)."""
        return list(self.loop.core.scheduler.requests)

    def deactivate(self) -> None:
        """The loop serves another role from now on: let go of what only this role uses."""

    def close(self) -> None:
        pass


class InstanceLoop:
    def __init__(
        self,
        name: InstanceId,
        host: str,
        core: EngineCore,
        policy: RolePolicy,
        idle_wait_s: float = 0.2,
        roles: dict[Role, RolePolicy] | None = None,
    ) -> None:
        """`roles`: every role the loop may switch to while serving (`policy` among them);
        none for an instance that keeps its role."""
        self.name = name
        self.core = core
        self.policy = policy
        self.idle_wait_s = idle_wait_s
        self.roles = roles or {}
        self.switching: RoleSwitch | None = None
        # Every policy is attached at once, ready to serve when switched to.
        self.policies = [policy, *(p for p in self.roles.values() if p is not policy)]
        accepts = {t for p in self.policies for t in p.accepts}
        self.inbox = Inbox(host, accept=(AbortRequest, *accepts), name=str(name))
        self.senders = SenderPool()
        # Other threads' messages (applied as if they came in the inbox) and closures to run.
        self.mailbox = Mailbox(beside=self.inbox)
        self.clients: dict[str, Client] = {}
        self.counters: Counter[str] = Counter()
        self.trimmer = MallocTrimmer()
        self.heartbeat = time.monotonic()  # of the last iteration; published for health checks
        self.steps = 0
        self.failed_steps = 0
        self.busy_s = 0.0  # time spent in steps, for the elastic controller's busy fraction
        self._running = False
        self._closed = False
        self._thread: threading.Thread | None = None
        # Prefix-cache changes to the routers this instance serves (cache-aware routing).
        self.reporter = CacheReporter(
            name, core.block_manager, lambda to, msg: self.send(to, msg, "router_send_failures")
        )
        for each in self.policies:
            each.attach(self)

    # ------------------------------------------------------------------ other threads
    def start(self) -> None:
        self._running = True
        self._thread = threading.Thread(target=self._run, name=f"{self.name}-loop", daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[], Any], timeout_s: float) -> Any:
        """Run `fn` on the loop thread and return its result; TimeoutError past the deadline."""
        future: Future = Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except Exception as exc:  # the caller's to handle, not the loop's
                future.set_exception(exc)

        self.mailbox.put(run)
        return future.result(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def heartbeat_age_s(self) -> float:
        return time.monotonic() - self.heartbeat

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._thread is not None:
            self.mailbox.put(lambda: setattr(self, "_running", False))
            self._thread.join(timeout_s)
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for policy in self.policies:
            policy.close()
        self.inbox.close()
        self.senders.close()
        self.mailbox.close()

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        try:
            self.core.warm_up()  # on this thread: part of what it builds is per thread
        except Exception:  # it serves without (its first requests pay what it would build)
            log.exception("%s: the engine warm-up failed", self.name)
        while self._running:
            try:
                self.iterate(self.idle_wait_s)
            except Exception:  # a bug outside any one request: keep serving, but say so
                self.counters["loop_errors"] += 1
                log.exception("%s: loop iteration failed", self.name)
                self.mailbox.wait(0.1)

    def iterate(self, idle_wait_s: float = 0.0) -> None:
        """Apply what arrived, check deadlines, run one step; block up to `idle_wait_s` when
        there is nothing to run. Tests call it directly to drive the loop step by step."""
        self.heartbeat = time.monotonic()
        for item in self.mailbox.take_all():
            self._apply(item)
        for msg in self.inbox.drain():
            if not refuse_misrouted(self, msg):
                self._apply(msg)
        self.policy.tick()
        if self.switching is not None:
            advance_switch(self)
        self.reporter.tick()
        sched = self.core.scheduler.schedule()
        idle = sched.is_empty and self.core.in_flight is None
        self.trimmer.maybe_trim(idle)
        if idle:
            if idle_wait_s > 0:
                self.mailbox.wait(idle_wait_s)
            return
        started = time.monotonic()
        self._step(sched)
        self.busy_s += time.monotonic() - started

    def _apply(self, item: Any) -> None:
        """One message or posted closure; an exception ends only the request it concerns."""
        try:
            if callable(item):
                item()
            elif isinstance(item, AbortRequest):
                self.abort(item.request_id)
            else:
                self.policy.handle(item)
        except Exception as exc:
            self.counters["handler_errors"] += 1
            log.exception("%s: handling %s failed", self.name, type(item).__name__)
            request_id = getattr(item, "request_id", None)
            if isinstance(request_id, str):
                error = f"internal error handling {type(item).__name__}: {exc}"
                self.fail_request(request_id, error)

    def _step(self, sched: SchedulerOutput) -> None:
        try:
            if not sched.is_empty:
                self.policy.before_step(sched)
            ready = self.core.execute_and_save(sched)  # overlap: the step before `sched`
            if ready is None:
                return
            deltas = self.core.scheduler.update_from_output(*ready)
            self.steps += 1
            self.publish(deltas)
        except Exception:  # a failed step ends its requests (and the step in flight's)
            self.failed_steps += 1
            error = traceback.format_exc(limit=5)
            log.error("%s: engine step failed:\n%s", self.name, error)
            in_flight = self.core.drop_in_flight()
            for failed in (sched, None if in_flight is sched else in_flight):
                if failed is not None and not failed.is_empty:
                    # The failed step no longer runs: blocks it held may be reused.
                    self.core.block_manager.step_done(failed.step_id)
                    for chunk in failed.chunks:
                        self.fail_request(chunk.request_id, error.strip().splitlines()[-1])

    # ------------------------------------------------------------------ used by the roles
    def new_request(self, msg: GenerateRequest) -> Request | None:
        """The engine's Request for `msg`, or None after telling the client why not."""
        try:
            request = Request(
                msg.request_id, msg.prompt_token_ids, msg.sampling, self.core.eos_token_ids
            )
            if msg.request_id in self.clients:
                raise ValueError(f"duplicate request id {msg.request_id}")
            if request.num_tokens >= self.core.max_model_len:
                raise ValueError(
                    f"prompt has {request.num_tokens} tokens; "
                    f"the context is {self.core.max_model_len}"
                )
        except (ValueError, TypeError) as exc:
            self.counters["failed_requests"] += 1
            item = TokenItem.failed(msg.request_id, 0, f"invalid request: {exc}")
            self._send({msg.reply_to: [item]})
            return None
        self.counters["requests"] += 1
        timings = Timings(arrival=msg.arrival_time)
        self.clients[msg.request_id] = Client(msg.reply_to, timings=timings)
        return request

    def abort(self, request_id: str) -> None:
        """The client is gone: end the request wherever it is, tell nobody."""
        if self.policy.drop(request_id, RequestStatus.FINISHED_ABORTED, "aborted"):
            self.clients.pop(request_id, None)
        else:
            self.counters["unknown_request_messages"] += 1

    def fail_request(self, request_id: str, error: str, overloaded: bool = False) -> None:
        """End a request with an error to its client; its blocks are freed (or, where KV may
        still move, freed once that ends)."""
        self.fail_client(request_id, error, overloaded)
        try:
            self.policy.drop(request_id, RequestStatus.FINISHED_ERROR, error)
        except Exception:  # the role's own records are broken: at least free the blocks
            log.exception("%s: dropping %s failed", self.name, request_id)
            self.core.abort_request(request_id, RequestStatus.FINISHED_ERROR)

    def fail_client(self, request_id: str, error: str, overloaded: bool = False) -> None:
        client = self.clients.pop(request_id, None)
        if client is not None:
            request = self.core.scheduler.requests.get(request_id)
            index = request.num_output_tokens if request is not None else 0
            self._send({client.reply_to: [TokenItem.failed(request_id, index, error, overloaded)]})

    def publish(self, deltas: list[TokenDelta]) -> None:
        """One TokenBatch per router for these deltas (never one message per token)."""
        now = time.time()
        by_router: dict[str, list[TokenItem]] = defaultdict(list)
        for delta in deltas:
            client = self.clients.get(delta.request_id)
            if client is not None:
                stamps = self.policy.stamps(delta, client, now)  # copied: the client's change
                timings = dataclasses.replace(stamps) if stamps is not None else None
                item = TokenItem.from_delta(delta, timings, client.decode)
                by_router[client.reply_to].append(item)
                if delta.finished:
                    del self.clients[delta.request_id]
            self.policy.after_delta(delta)
        self._send(by_router)

    def _send(self, items_by_router: dict[str, list[TokenItem]]) -> None:
        self.reporter.add_routers(items_by_router)
        for address, items in items_by_router.items():
            self.send(address, TokenBatch(self.name, items), "router_send_failures")

    def send(self, address: str, msg: Any, failure_counter: str) -> bool:
        try:
            self.senders.send(address, msg)
            return True
        except ChannelError:
            self.counters[failure_counter] += 1
            return False

    def stats(self) -> dict:
        scheduler, blocks = self.core.scheduler, self.core.block_manager
        return {
            "name": str(self.name),
            "pid": os.getpid(),
            "rss_mb": rss_mb(),
            "inbox": self.inbox.address,
            "role": self.policy.role.value,
            "running": len(scheduler.running),
            "waiting": len(scheduler.waiting),
            "requests": len(scheduler.requests),
            "num_blocks": blocks.num_blocks,
            "free_blocks": blocks.num_free_blocks,
            "tracked": len(self.clients),
            "counters": dict(self.counters),
            "bad_frames": self.inbox.bad_frames,
            "heartbeat_age_s": self.heartbeat_age_s(),
            "steps": self.steps,
            "failed_steps": self.failed_steps,
            "busy_s": self.busy_s,
            "max_num_seqs": scheduler.config.max_num_seqs,
            "switching_to": self.switching.target.value if self.switching is not None else None,
            "roles": sorted(r.value for r in self.roles),
            **self.policy.stats(),
        }
