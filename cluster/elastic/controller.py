"""The elastic controller: every `elastic.decision_interval_s` it looks at what the router and
the instances report, asks the policy, and carries the decisions out.

One loop thread owns all of its state. Carrying out a decision takes seconds (an instance drains
before it switches), so each runs on a worker thread that owns nothing: it calls the actuator
and posts the outcome back to the loop's queue. Ray's method threads (stats, a forced switch)
also post to that queue. Every decision is logged with its reason and counted; `stats()` holds
the counters and the last decisions (`pdserve status` shows them, the router's /metrics counts
them).

What acting means is behind `Actuator`: the Ray deployment's (cluster/elastic/ray_actuator.py)
or a test's.
"""

from __future__ import annotations

import logging
import queue
import statistics
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from cluster.config import PdserveConfig
from cluster.elastic.policy import Decision, DecisionKind, ElasticPolicy
from cluster.elastic.snapshot import SnapshotBuilder
from engine.config import Role

log = logging.getLogger(__name__)
_KEPT_DECISIONS = 50


class Actuator(Protocol):
    def collect(self) -> tuple[dict | None, list[dict]]:
        """(router stats, every instance's stats); a dead instance's carries an "error"."""

    def can_switch(self) -> bool:
        """The instances can switch roles while serving; else the controller only advises."""

    def switch(self, name: str, role: Role) -> None:
        """Return once `name` serves in `role`; raise if it could not (it then still serves in
        its old role, or has failed and is the supervisor's)."""

    def add(self, role: Role) -> str:
        """Start one more instance in `role` (asking the cluster for resources); its name."""

    def remove(self, name: str) -> None:
        """Drain and stop an instance."""

    def can_add(self) -> bool:
        """The cluster has (or may get) room for one more instance."""

    def removable(self) -> set[str]:
        """The instances `remove` may take away (those it added)."""


@dataclass
class DecisionRecord:
    at: float  # wall clock
    kind: str
    instance: str | None
    from_role: str | None
    to_role: str
    reason: str
    outcome: str = "pending"  # pending | done | failed: why
    seconds: float | None = None  # decided -> carried out


class ElasticController:
    def __init__(
        self,
        config: PdserveConfig,
        actuator: Actuator,
        clock: Callable[[], float] = time.monotonic,
        workers: int = 4,
    ) -> None:
        self.config = config
        self.actuator = actuator
        self.policy = ElasticPolicy(config.elastic, config.slo)
        self.builder = SnapshotBuilder()
        self.interval_s = config.elastic.decision_interval_s
        self.clock = clock
        self.counters: Counter[str] = Counter()
        self.records: deque[DecisionRecord] = deque(maxlen=_KEPT_DECISIONS)
        self.switch_seconds: deque[float] = deque(maxlen=200)
        self.busy: set[str] = set()  # instances with an action in flight
        self.adding = 0  # adds in flight: no other is decided meanwhile
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="elastic-act")
        self._running = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ other threads
    def start(self) -> None:
        self._running = True
        self._thread = threading.Thread(target=self._run, name="elastic-controller", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._inbox.put(self._halt)
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def call(self, fn: Callable[[], Any], timeout_s: float = 10.0) -> Any:
        """Run `fn` on the loop (directly when the loop is not running: tests, shutdown)."""
        if self._thread is None or not self._thread.is_alive():
            return fn()
        future: Future = Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except Exception as exc:
                future.set_exception(exc)

        self._inbox.put(run)
        return future.result(timeout_s)

    def stats(self) -> dict:
        return self.call(self._stats)

    def force_switch(self, name: str, role: Role | str, wait_s: float = 0.0) -> dict:
        """An operator's switch, carried out like the policy's (its reason says so). Returns
        its record once carried out, or as it is after `wait_s` (outcome "pending")."""
        return self.force(DecisionKind.SWITCH, Role(role), name, wait_s)

    def force(self, kind: DecisionKind, role: Role, name: str | None, wait_s: float = 0.0) -> dict:
        """An operator's switch, add (`role`; `name` None) or remove (`name`, of `role`),
        carried out as `force_switch` says."""

        def order() -> DecisionRecord:
            decision = Decision(kind, role, "forced by an operator", self.clock(), name, None)
            return self._carry_out(decision)

        record = self.call(order)
        deadline = time.monotonic() + wait_s
        while True:
            seen = self.call(lambda: asdict(record))
            if seen["outcome"] != "pending" or time.monotonic() >= deadline:
                return seen
            time.sleep(0.2)

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        next_look = self.clock()
        while self._running:
            try:
                self._inbox.get(timeout=max(0.0, next_look - self.clock()))()
            except queue.Empty:
                pass
            except Exception:  # a posted closure failed: the loop goes on
                log.exception("elastic controller: a posted call failed")
            if self._running and self.clock() >= next_look:
                next_look = self.clock() + self.interval_s
                try:
                    self.step()
                except Exception:  # stats that did not come, a policy bug: try next time
                    self.counters["step_errors"] += 1
                    log.exception("elastic controller: a decision step failed")

    def _halt(self) -> None:
        self._running = False

    def drain_outcomes(self) -> None:
        """Apply the outcomes workers posted (the loop does this itself; tests call it)."""
        while True:
            try:
                self._inbox.get_nowait()()
            except queue.Empty:
                return

    def step(self) -> list[Decision]:
        """One look: collect, decide, start carrying out. Returns the decisions."""
        router, instances = self.actuator.collect()
        snap = self.builder.build(
            self.clock(),
            router,
            instances,
            unavailable=set(self.busy),
            can_add=self.config.elastic.autoscale and not self.adding and self.actuator.can_add(),
            removable=self.actuator.removable(),
        )
        decisions = self.policy.decide(snap) if self.config.elastic.enabled else []
        for decision in decisions:
            self._carry_out(decision)
        return decisions

    def _carry_out(self, decision: Decision) -> DecisionRecord:
        record = DecisionRecord(
            at=time.time(),
            kind=decision.kind.value,
            instance=decision.instance,
            from_role=decision.from_role.value if decision.from_role else None,
            to_role=decision.to_role.value,
            reason=decision.reason,
        )
        log.warning("elastic: %s", decision.describe())
        self.records.append(record)
        self.counters[_counter_name(decision)] += 1
        if not self.actuator.can_switch():
            record.outcome = "advice: not carried out (instances cannot switch roles yet)"
            self.counters["advice_only"] += 1
            return record
        if decision.instance is not None:
            self.busy.add(decision.instance)
        if decision.kind is DecisionKind.ADD:
            self.adding += 1
        started = self.clock()
        self._pool.submit(self._act, decision, record, started)
        return record

    def _act(self, decision: Decision, record: DecisionRecord, started: float) -> None:
        """On a worker thread: call the actuator, post the outcome to the loop."""
        try:
            added = None
            if decision.kind is DecisionKind.SWITCH:
                self.actuator.switch(decision.instance, decision.to_role)
            elif decision.kind is DecisionKind.ADD:
                added = self.actuator.add(decision.to_role)
                log.warning("elastic: added %s", added)
            else:
                self.actuator.remove(decision.instance)
            error = None
        except Exception as exc:
            log.exception("elastic: %s failed", decision.describe())
            error = f"{type(exc).__name__}: {exc}"
        self._inbox.put(lambda: self._finished(decision, record, started, error, added))

    def _finished(
        self,
        decision: Decision,
        record: DecisionRecord,
        started: float,
        error: str | None,
        added: str | None = None,
    ) -> None:
        if decision.kind is DecisionKind.ADD:
            self.adding -= 1
            record.instance = added  # the new instance's name (None if it failed)
        record.seconds = self.clock() - started
        record.outcome = "done" if error is None else f"failed: {error}"
        self.counters[f"{decision.kind.value}_{'done' if error is None else 'failed'}"] += 1
        if decision.kind is DecisionKind.SWITCH and error is None:
            self.switch_seconds.append(record.seconds)
        self.busy.discard(decision.instance)

    def _stats(self) -> dict:
        seconds = list(self.switch_seconds)
        return {
            "name": "elastic-controller",
            "role": "controller",
            "enabled": self.config.elastic.enabled,
            "counters": dict(self.counters),
            "busy": sorted(self.busy),
            "switch_seconds_p50": statistics.median(seconds) if seconds else None,
            "decisions": [asdict(r) for r in self.records],
        }


def _counter_name(decision: Decision) -> str:
    if decision.kind is DecisionKind.SWITCH:
        source = decision.from_role.value if decision.from_role else "any"
        return f"decided_switch_{source}_to_{decision.to_role.value}"
    return f"decided_{decision.kind.value}_{decision.to_role.value}"
