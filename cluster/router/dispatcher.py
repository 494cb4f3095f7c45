"""The router's side of the token protocol: choose an instance, send requests, receive tokens.

One `Dispatcher` lives on the router's event loop. It binds the router's token inbox, sends each
`GenerateRequest` to the PREFILL or MIXED instance that `InstanceChooser` picks (fewest
outstanding prefill tokens -- prompt tokens to compute whose first output token has not come
back -- and, with cache-aware routing, the prefix it holds), and feeds every `TokenItem` to its
request's `RequestStream`, which orders the tokens and enforces the first- and next-token
deadlines. `release()` ends a request's life in the router: unless an instance already finished
it, the instances that hold it are told to abort it (the one it was sent to, the decode instance
P reported, any that sent tokens; P itself cancels a D it chose but has not reported yet).
Nothing about a request outlives its `release()`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

import zmq
import zmq.asyncio

from cluster.config import RouterConfig, SloConfig
from cluster.elastic.slo_window import SloWindow
from cluster.metrics import RouterMetrics
from cluster.router.cache_routing import InstanceChooser
from cluster.router.capacity_wait import CapacityWaits
from cluster.router.migration import MAX_MOVES, continuation
from cluster.router.streams import RequestStream
from cluster.router.timings import TimingSplit
from engine.config import Role
from engine.protocol.cache_events import PrefixCacheEvents
from engine.protocol.channels import AsyncInbox, AsyncSender, ChannelError
from engine.protocol.identity import InstanceId
from engine.protocol.requests import AbortRequest, GenerateRequest
from engine.protocol.tokens import TokenBatch, TokenItem
from engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)

_GENERATE_ROLES = (Role.PREFILL, Role.MIXED)
# Finishes after which no instance holds anything for the request. After an error or an abort
# the instance that reported it has let go, but the other side (P or D) may not have.
_CLEAN_FINISHES = ("stop", "length")
_ABORT_SEND_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class InstanceEndpoint:
    """Where an instance takes requests: its name (as in `TokenBatch.source`), role and inbox."""

    name: InstanceId
    role: Role
    inbox: str

    @classmethod
    def from_dict(cls, data: dict) -> InstanceEndpoint:
        name = data["name"]
        assert isinstance(name, InstanceId), name
        return cls(name=name, role=Role(data["role"]), inbox=str(data["inbox"]))

    @property
    def takes_requests(self) -> bool:
        return self.role in _GENERATE_ROLES


class Overloaded(Exception):
    """`max_inflight_requests` requests are in flight already."""


class NoInstance(Exception):
    """No prefill or mixed instance could take the request."""


class Dispatcher:
    """Instance choice, the token inbox and the in-flight requests of one router event loop."""

    def __init__(
        self,
        endpoints: Iterable[InstanceEndpoint],
        host: str,
        config: RouterConfig,
        slo: SloConfig | None = None,
    ) -> None:
        self.endpoints = list(endpoints)
        slo = slo or SloConfig()
        # SLO attainment of recent requests, for the elastic controller (stats()["slo"]).
        self.slo_window = SloWindow(slo.ttft_ms, slo.tpot_ms, slo.window_s)
        self._host = host
        self._config = config
        self._streams: dict[str, RequestStream] = {}
        self._outstanding = {e.name: 0 for e in self.endpoints if e.takes_requests}
        self._background: set[asyncio.Task] = set()
        self._counters = {
            "unknown_items": 0,
            "duplicate_tokens": 0,
            "aborts_sent": 0,
            "abort_send_failures": 0,
            "timeouts": 0,
        }
        self._ctx: zmq.asyncio.Context | None = None
        self._inbox: AsyncInbox | None = None
        self._senders: dict[str, AsyncSender] = {}
        self._receiver: asyncio.Task | None = None
        self.timing_split = TimingSplit()
        self.metrics = RouterMetrics()
        self.chooser = InstanceChooser(config, self.metrics)
        self._down: set[InstanceId] = set()  # instances reported dead, until update_endpoints
        # What a retry needs to resend a request that a dead instance never started.
        self._resend: dict[int, GenerateRequest] = {}
        # Started streams refused for lack of capacity, sent again after a backoff.
        self.capacity = CapacityWaits(config.capacity_wait_s, self._move)

    # -------------------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Bind the inbox and connect to every instance; call on the loop that serves requests."""
        self._ctx = zmq.asyncio.Context()
        self._inbox = AsyncInbox(self._ctx, self._host, accept=(TokenBatch, PrefixCacheEvents))
        self._senders = {e.name: AsyncSender(self._ctx, e.inbox) for e in self.endpoints}
        self._receiver = asyncio.get_running_loop().create_task(self._receive_loop())

    async def close(self) -> None:
        """Abort whatever is still in flight, then close every socket."""
        for request_id in list(self._streams):
            self.release(request_id, "router shutting down")
        self.capacity.close()
        await self.wait_background()
        if self._receiver is not None:
            self._receiver.cancel()
            await asyncio.gather(self._receiver, return_exceptions=True)
        for sender in self._senders.values():
            sender.close()
        if self._inbox is not None:
            self._inbox.close()
        if self._ctx is not None:
            self._ctx.destroy(linger=0)

    @property
    def inbox_address(self) -> str:
        assert self._inbox is not None, "start() first"
        return self._inbox.address

    # -------------------------------------------------------------------------- requests
    async def submit(
        self, prompt_token_ids: list[int], sampling: SamplingParams, request_id: str | None = None
    ) -> RequestStream:
        """Send a request to the least loaded instance; its tokens arrive on the stream."""
        self.check_capacity(1)
        endpoint, cached_tokens = self._choose_instance(prompt_token_ids, sampling.cache_salt)
        request_id = request_id or uuid.uuid4().hex
        stream = RequestStream(
            request_id,
            endpoint.name,
            len(prompt_token_ids),
            self._config,
            logprobs=sampling.logprobs is not None,
        )
        stream.prefill_tokens = len(prompt_token_ids) - cached_tokens
        # Registered before sending: the first token may come back before send() returns.
        self._streams[request_id] = stream
        self._outstanding[endpoint.name] += stream.prefill_tokens
        if endpoint.role is Role.PREFILL:
            stream.decode_hint = self._choose_decode(prompt_token_ids, sampling.cache_salt)
        msg = GenerateRequest(
            request_id,
            list(prompt_token_ids),
            sampling,
            self.inbox_address,
            time.time(),
            decode_hint=stream.decode_hint,
            reuse_decode_prefix=self.chooser.policy.cache_aware,
        )
        self._resend[id(stream)] = msg
        try:
            await self._senders[endpoint.name].send(msg)
        except ChannelError as exc:
            self.release(request_id, "send failed")
            raise NoInstance(f"instance {endpoint.name} is not reachable: {exc}") from None
        return stream

    # -------------------------------------------------------------------------- failures
    def instance_down(self, name: InstanceId) -> dict[str, int]:
        """`name` died: retry on another instance the requests it never started, move the rest
        of its requests to other instances (migration, router.migrate_on_failure; else they
        fail), and choose it no more until `update_endpoints`."""
        self._down.add(name)
        self.chooser.instance_down(name)
        if name in self._outstanding:
            self._outstanding[name] = 0
        retried = failed = 0
        for stream in list(self._streams.values()):
            if stream.finish is not None or self.capacity.is_parked(stream):
                continue  # a parked stream holds nothing on any instance
            never_started = stream.instance == name and stream.awaiting_first_token
            if never_started and self._move(stream, "retried on another instance"):
                retried += 1
            elif name in (stream.instance, stream.decode_instance) or name in stream.sources:
                moved = self._config.migrate_on_failure and self._move(stream, f"{name} died")
                if not moved:
                    stream.fail("error", f"instance {name} failed while serving this request")
                    failed += 1
        self._counters["retried_requests"] = self._counters.get("retried_requests", 0) + retried
        return {"retried": retried, "failed": failed}

    def fail_inflight(self, error: str) -> int:
        """End every unfinished request with an error (the router is stopping): streams get an
        error event instead of a cut connection. Returns how many were ended."""
        unfinished = [s for s in self._streams.values() if s.finish is None]
        for stream in unfinished:
            stream.fail("error", error)
        return len(unfinished)

    def update_endpoints(self, endpoints: Iterable[InstanceEndpoint]) -> None:
        """New inboxes after restarts; instances listed here are in service again."""
        assert self._ctx is not None, "start() first"
        for endpoint in endpoints:
            old = next((e for e in self.endpoints if e.name == endpoint.name), None)
            if old is None or old.inbox != endpoint.inbox:
                if endpoint.name in self._senders:
                    self._senders[endpoint.name].close()
                self._senders[endpoint.name] = AsyncSender(self._ctx, endpoint.inbox)
            if endpoint.takes_requests:
                self._outstanding.setdefault(endpoint.name, 0)
            self._down.discard(endpoint.name)
        self.endpoints = list(endpoints)

    def _move(self, stream: RequestStream, why: str) -> bool:
        """Send the request again as its next attempt (a request of its own on the wire, see
        `RequestStream.move`), the continuation after the tokens released so far (migration.py:
        unchanged when there are none), to the least loaded instance. The instances that held
        the earlier attempt may still hold state under its id: it is aborted."""
        candidates = [e for e in self.endpoints if e.takes_requests and e.name not in self._down]
        first = self._resend.get(id(stream))
        failures = stream.attempt - stream.capacity_retries  # waits for capacity are no failure
        if not candidates or first is None or failures >= MAX_MOVES:
            return False
        rest = continuation(first.prompt_token_ids, first.sampling, stream.output_ids)
        if rest is None:  # every token it may have was released: it ended at max_tokens
            stream.add(TokenItem(stream.request_id, 0, [], finish_reason="length"))
            return True
        # Another instance than the one that failed it, when there is one (it may fail again).
        others = [e for e in candidates if e.name != stream.instance] or candidates
        endpoint = min(others, key=lambda e: self._outstanding[e.name])
        earlier = AbortRequest(stream.request_id, why)
        stream.move(endpoint.name)
        self._streams[stream.request_id] = self._streams.pop(earlier.request_id)
        stream.prefill_tokens = len(rest.prompt)
        self._outstanding[endpoint.name] += stream.prefill_tokens
        msg = dataclasses.replace(
            first,
            request_id=stream.request_id,
            prompt_token_ids=rest.prompt,
            sampling=rest.sampling,
            arrival_time=time.time(),
            attempt=stream.attempt,
        )
        self._spawn(self._senders[endpoint.name].send(msg))
        # Broadcast: the dead instance may have chosen a D that the router never heard of.
        self._spawn(self._abort(earlier, set(self._senders)))
        self._counters["moved_requests"] = self._counters.get("moved_requests", 0) + 1
        return True

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def check_capacity(self, count: int) -> None:
        """Raise Overloaded unless `count` more requests fit under max_inflight_requests and no
        started stream waits for KV capacity (freed blocks go to those first)."""
        if len(self._streams) + count > self._config.max_inflight_requests:
            raise Overloaded(f"{len(self._streams)} requests in flight; try again shortly")
        if self.capacity.waiting:
            waiting = self.capacity.waiting
            raise Overloaded(f"{waiting} started requests are waiting for KV capacity; try again")

    def release(
        self, request_id: str, reason: str, timed_out: bool = False, outcome: str | None = None
    ) -> None:
        """Forget a request; unless an instance finished it cleanly, tell the instances that
        hold it to abort it. Synchronous, so it is safe in `finally` blocks of cancelled tasks;
        idempotent. `outcome`: how the client saw it end when the router ended it (a stop
        string: "stop")."""
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return
        self._resend.pop(id(stream), None)
        self.capacity.forget(stream)
        self._first_token_seen(stream)
        self.chooser.request_ended(stream.decode_hint, stream.cached_tokens_by)
        phases = self.timing_split.record(stream.stamps)
        if outcome is None:
            outcome = stream.finish.reason if stream.finish is not None else "abort"
        record = stream.record(phases, "timeout" if timed_out else outcome)
        self.metrics.observe(record)
        self.slo_window.observe(
            record.outcome,
            record.arrival,
            record.first_token,
            record.finished,
            record.output_tokens,
        )
        if stream.finish is None or stream.finish.reason not in _CLEAN_FINISHES:
            self._counters["timeouts"] += timed_out
            self._spawn(self._abort(AbortRequest(request_id, reason), stream.holders()))

    async def wait_background(self) -> None:
        """Wait until every abort scheduled so far has been sent (or has failed)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    def _choose_instance(
        self, prompt: list[int], cache_salt: str | None = None
    ) -> tuple[InstanceEndpoint, int]:
        """The instance to prefill `prompt`, and how many of its tokens it is expected to hold."""
        candidates = [e for e in self.endpoints if e.takes_requests and e.name not in self._down]
        if not candidates:
            raise NoInstance("no prefill or mixed instance is configured")
        decision = self.chooser.choose_prefill(
            [(e.name, e.role) for e in candidates], self._outstanding, list(prompt), cache_salt
        )
        return next(e for e in candidates if e.name == decision.name), decision.cached_tokens

    def _choose_decode(self, prompt: list[int], cache_salt: str | None) -> InstanceId | None:
        """With cache-aware routing, the decode instance P should try first."""
        down = self._down
        names = [e.name for e in self.endpoints if e.role is Role.DECODE and e.name not in down]
        decision = self.chooser.choose_decode(names, prompt, cache_salt) if names else None
        return None if decision is None else decision.name

    def _first_token_seen(self, stream: RequestStream) -> None:
        if stream.awaiting_first_token:
            stream.awaiting_first_token = False
            self._outstanding[stream.instance] -= stream.prefill_tokens

    async def _abort(self, msg: AbortRequest, instances: set[InstanceId]) -> None:
        """Send `msg` to each of `instances` (names without a sender are skipped)."""
        names = [name for name in self._senders if name in instances]
        results = await asyncio.gather(
            *(self._senders[n].send(msg, timeout_s=_ABORT_SEND_TIMEOUT_S) for n in names),
            return_exceptions=True,
        )
        for name, result in zip(names, results, strict=True):
            if isinstance(result, BaseException):
                self._counters["abort_send_failures"] += 1
                log.warning("abort of %s not sent to %s: %s", msg.request_id, name, result)
            else:
                self._counters["aborts_sent"] += 1

    # -------------------------------------------------------------------------- tokens
    async def _receive_loop(self) -> None:
        assert self._inbox is not None
        while True:
            batch = await self._inbox.recv()
            if isinstance(batch, PrefixCacheEvents):
                self.chooser.on_report(batch)
                continue
            for item in batch.items:
                try:
                    self._route(item, batch.source)
                except Exception:
                    # A bug handling one item must not stop the tokens of every other request.
                    log.exception("router: failed to handle tokens of %s", item.request_id)
                    stream = self._streams.get(item.request_id)
                    if stream is not None:
                        stream.fail("error", "router failed to handle this request's tokens")

    def _route(self, item: TokenItem, source: InstanceId) -> None:
        stream = self._streams.get(item.request_id)
        if stream is None:  # late tokens of a request that ended, was aborted or was resent
            self._counters["unknown_items"] += 1
            return
        stream.sources.add(source)
        stream.cached_tokens_by[source] = item.num_cached_tokens
        self._first_token_seen(stream)
        if item.token_ids:
            self.capacity.progressed(stream)
        # No decode instance had room: a stream under way waits for some (capacity_wait.py).
        refused = item.finish_reason == "overloaded"
        if refused and self.capacity.park(stream, item.error or "no capacity"):
            return
        # A failed transfer, a lost peer, an expired lease: the request goes on elsewhere (the
        # tokens of this last item come again from the continuation).
        failed = item.finish_reason == "error" and self._config.migrate_on_failure
        if failed and self._move(stream, f"{source} failed it: {item.error}"):
            return
        self._counters["duplicate_tokens"] += stream.add(item)

    # -------------------------------------------------------------------------- inspection
    @property
    def num_inflight(self) -> int:
        return len(self._streams)

    def outstanding_prefill_tokens(self) -> dict[str, int]:
        return {str(name): tokens for name, tokens in self._outstanding.items()}

    def stats(self) -> dict:
        return {
            "inflight_requests": len(self._streams),
            "slo": self.slo_window.view(time.monotonic()).to_dict(),
            "outstanding_prefill_tokens": self.outstanding_prefill_tokens(),
            "pending_aborts": len(self._background),
            "bad_frames": self._inbox.bad_frames if self._inbox is not None else 0,
            "ttft_split": self.timing_split.summary(),
            "routing": self.chooser.stats(),
            "capacity_waits": self.capacity.parks,
            "capacity_waits_expired": self.capacity.expired,
            "waiting_for_capacity": self.capacity.waiting,
            **self._counters,
        }
