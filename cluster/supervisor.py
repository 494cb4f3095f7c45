"""Keeps a deployment whole: notices crashed or stalled actors, tells the survivors, re-wires.

Ray restarts a crashed instance or messager actor (`cluster.restart_crashed_actors`), running
its constructor again. The supervisor, a thread in the process that deployed, checks every
actor each `cluster.health_check_interval_s`. An actor has failed when Ray reports it dead, or
when it answers but its loop has not gone round for `cluster.heartbeat_timeout_s` (stuck in a
step or a wait that never ends): the supervisor kills that one, so that Ray restarts it. Then it
1. tells the others at once: prefill instances and messagers stop sending to a dead decode
   instance (their requests for it end with an error), and the router fails or retries the
   requests that instance held, so no client waits for a deadline;
2. waits for Ray to restart the actor, calls its `setup()` again and wires it back in (new
   inbox and transfer endpoint; a restarted prefill instance gets its messager re-attached).
An actor that does not answer the probe at all is left to the request deadlines: its method
threads are busy, and killing it would race with work it may still finish.

Re-wiring is bounded. A restart that cannot be wired in (its `setup()` fails
`MAX_SETUP_FAILURES` times in a row) is restarted afresh once: for a cache messager that means
its prefill instance too, whose shared-memory KV cache is what the messager maps, re-created by
P's constructor (a segment gone is the usual cause). Should that fail as well, or an actor not
be back from Ray's restart within `cluster.startup_timeout_s`, the supervisor gives it up: it
stays out of service (the router sends it nothing; a messager's prefill instance is announced
down) and is logged, instead of being retried every round for ever.
"""

from __future__ import annotations

import enum
import logging
import threading
import time

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

from cluster.deployment import Deployment, reconnect_decodes, refresh_roles, wire_prefill
from engine.config import Role
from engine.protocol.identity import InstanceId, MessagerId, WorkerId

log = logging.getLogger(__name__)

MAX_SETUP_FAILURES = 3  # setups in a row that failed (not "still restarting") before acting


class Health(enum.Enum):
    ALIVE = "alive"
    DEAD = "dead"  # Ray says the process is gone (it may be restarting)
    RESTARTED = "restarted"  # Ray restarted it already: not set up, not wired
    STALLED = "stalled"  # answers, but its loop stopped going round
    UNKNOWN = "unknown"  # no answer in time: left to the request deadlines

    @property
    def failed(self) -> bool:
        return self in (Health.DEAD, Health.RESTARTED, Health.STALLED)


class Probe(enum.Enum):
    """Probe outcomes that carry no heartbeat."""

    DEAD = "dead"
    NO_ANSWER = "no answer"


def judge(answer: Probe | float | None, timeout_s: float) -> Health:
    """The verdict on one probe of `heartbeat_age_s()`: its answer (seconds since the loop last
    went round, or None before setup()), or why there is none."""
    if answer is Probe.DEAD:
        return Health.DEAD
    if answer is Probe.NO_ANSWER:
        return Health.UNKNOWN
    if answer is None:
        return Health.RESTARTED
    return Health.STALLED if answer > timeout_s else Health.ALIVE


class Supervisor:
    def __init__(self, dep: Deployment, probe_timeout_s: float = 10.0) -> None:
        self.dep = dep
        self.interval_s = dep.config.cluster.health_check_interval_s
        self.heartbeat_timeout_s = dep.config.cluster.heartbeat_timeout_s
        self.probe_timeout_s = probe_timeout_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pdserve-supervisor", daemon=True)
        self.recoveries: list[str] = []  # names revived, in order (for tests and logs)
        self.stalls: list[str] = []  # names killed for a stalled loop, in order
        self._unrevived: set[WorkerId] = set()  # failed, not wired in yet: retried each round
        self._failed_since: dict[WorkerId, float] = {}  # monotonic, first failure not wired in
        self._setup_failures: dict[WorkerId, int] = {}  # in a row, for the current failure
        self._restarted_afresh: set[WorkerId] = set()  # forced restarts (once per failure)
        self._lost: set[WorkerId] = set()
        self.lost: list[str] = []  # names given up on, in order

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.probe_timeout_s + 1)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.check_all()

    def check_all(self) -> None:
        """One round over every actor (the elastic controller's added ones included)."""
        self.sync_members()
        for worker in self.dep.workers():
            if self._stop.is_set():
                return
            try:
                self._check(worker)
            except Exception:  # the watch must go on whatever one check does
                log.exception("supervisor: checking %s failed", worker)

    def sync_members(self) -> None:
        """Elastic: watch the instances the controller added; let go of those it removed (it
        lists them no more before it stops them, so their end is no failure)."""
        if self.dep.controller is None:
            return
        try:
            members = ray.get(self.dep.controller.members.remote(), timeout=self.probe_timeout_s)
        except Exception as exc:  # the controller's own failure: membership stays as it was
            log.warning("supervisor: could not read the elastic controller's members: %s", exc)
            return
        taken, forgotten = self.dep.sync_added(members)
        for name in forgotten:
            for worker in (name, MessagerId(name.index, name.role)):
                self._unrevived.discard(worker)
                self._failed_since.pop(worker, None)
                self._setup_failures.pop(worker, None)
                self._restarted_afresh.discard(worker)
                self._lost.discard(worker)
        if taken or forgotten:
            log.warning("supervisor: now watching %s; let go of %s", taken, forgotten)

    def _check(self, worker: WorkerId) -> None:
        if worker in self._lost or worker not in self.dep.workers():
            return  # given up, or removed by the elastic controller since the round began
        if isinstance(worker, MessagerId) and worker.prefill in self._unrevived | self._lost:
            return  # reviving its prefill instance sets it up again (wire_prefill)
        if worker in self._unrevived:
            self._recover(worker)
            return
        health = self._probe(worker)
        if health.failed:
            self.sync_members()  # one that the elastic controller removed is no failure
            if worker not in self.dep.workers():
                return
        if health is Health.STALLED:
            log.error(
                "supervisor: %s has not gone round its loop for over %.0f s; restarting it",
                worker,
                self.heartbeat_timeout_s,
            )
            self.stalls.append(str(worker))
            ray.kill(self.dep.actor(worker), no_restart=False)
        if health.failed:
            self._recover(worker)

    def _probe(self, worker: WorkerId) -> Health:
        answer: Probe | float | None
        try:
            ref = self.dep.actor(worker).heartbeat_age_s.remote()
            answer = ray.get(ref, timeout=self.probe_timeout_s)
        except GetTimeoutError:
            log.warning("supervisor: %s did not answer in %.0f s", worker, self.probe_timeout_s)
            answer = Probe.NO_ANSWER
        except RayActorError:
            answer = Probe.DEAD
        return judge(answer, self.heartbeat_timeout_s)

    def _recover(self, worker: WorkerId) -> None:
        if worker not in self._unrevived:
            log.warning("supervisor: %s failed; failing its requests, awaiting restart", worker)
            self._announce_down(worker)
            self._unrevived.add(worker)
            self._failed_since[worker] = time.monotonic()
        try:
            self._revive(worker)
        except (ActorUnavailableError, RayActorError, GetTimeoutError) as exc:
            log.info("supervisor: %s not back yet: %s", worker, type(exc).__name__)
            self._restart_overdue(worker)
            return  # still restarting: next round
        except Exception as exc:  # setup itself failed: again next round, within bounds
            log.error("supervisor: %s could not be revived: %s", worker, exc)
            self._setup_failed(worker, exc)
            return
        self._back(worker)

    def _back(self, worker: WorkerId) -> None:
        revived = [worker]
        if isinstance(worker, InstanceId) and worker.role is Role.PREFILL:
            revived.append(MessagerId(worker.index))  # wire_prefill set its messager up too
        for name in revived:
            self._unrevived.discard(name)
            self._failed_since.pop(name, None)
            self._setup_failures.pop(name, None)
            self._restarted_afresh.discard(name)
        self.recoveries.append(str(worker))
        log.warning("supervisor: %s is back", worker)

    def _restart_overdue(self, worker: WorkerId) -> None:
        """Give up on an actor Ray does not bring back: restarts are off, or it has taken
        longer than an actor may take to start."""
        waited = time.monotonic() - self._failed_since.get(worker, time.monotonic())
        if not self.dep.config.cluster.restart_crashed_actors:
            self._give_up(worker, "cluster.restart_crashed_actors is off")
        elif waited > self.dep.config.cluster.startup_timeout_s:
            self._give_up(worker, f"not restarted within {waited:.0f} s")

    def _setup_failed(self, worker: WorkerId, exc: Exception) -> None:
        """Its restart is up but cannot be wired in: after `MAX_SETUP_FAILURES` in a row,
        restart it afresh (a messager together with its prefill instance, which re-creates the
        KV cache the messager maps); if that was done already, give it up."""
        failures = self._setup_failures.get(worker, 0) + 1
        self._setup_failures[worker] = failures
        if failures < MAX_SETUP_FAILURES:
            return
        if worker in self._restarted_afresh:
            self._give_up(worker, f"setup failed {failures} times after a fresh restart: {exc}")
            return
        self._restart_afresh(worker)

    def _restart_afresh(self, worker: WorkerId) -> None:
        self._setup_failures.pop(worker, None)
        self._restarted_afresh.add(worker)
        if isinstance(worker, MessagerId):
            prefill = worker.prefill
            log.error("supervisor: %s cannot be set up; restarting it and %s", worker, prefill)
            self._unrevived.discard(worker)  # wired in again by its prefill instance's revival
            self._restarted_afresh.add(prefill)
            if prefill not in self._unrevived:
                self._announce_down(prefill)  # its requests move to other instances
                self._unrevived.add(prefill)
                self._failed_since[prefill] = time.monotonic()
            victims: list[WorkerId] = [prefill, worker]
        else:
            log.error("supervisor: %s cannot be set up; restarting it", worker)
            victims = [worker]
        for victim in victims:
            try:
                ray.kill(self.dep.actor(victim), no_restart=False)
            except Exception as exc:  # already dead: Ray restarts it all the same
                log.warning("supervisor: killing %s failed: %s", victim, exc)

    def _give_up(self, worker: WorkerId, why: str) -> None:
        """Out of service for good: the router sends it nothing (a messager's prefill instance
        is announced down as well, as it cannot hand KV over without it)."""
        log.error("supervisor: giving up on %s: %s", worker, why)
        self._unrevived.discard(worker)
        self._failed_since.pop(worker, None)
        self._setup_failures.pop(worker, None)
        self._lost.add(worker)
        self.lost.append(str(worker))
        if isinstance(worker, MessagerId) and worker.prefill not in self._unrevived:
            self._announce_down(worker.prefill)

    def _announce_down(self, worker: WorkerId) -> None:
        dep = self.dep
        calls = []
        if isinstance(worker, InstanceId) and dep.may_decode(worker):
            takers = [dep.actor(i) for i in dep.may_prefill() if i != worker]
            calls += [p.decode_down.remote(worker) for p in takers]
            messagers = [*dep.messagers.values(), *dep.spare_messagers.values()]
            calls += [m.decode_down.remote(worker) for m in messagers]
        if isinstance(worker, InstanceId):
            calls.append(dep.router.instance_down.remote(worker))
        _best_effort(calls, self.probe_timeout_s)

    def _revive(self, worker: WorkerId) -> None:
        dep = self.dep
        timeout = dep.config.cluster.startup_timeout_s
        if isinstance(worker, MessagerId):
            wire_prefill(dep, worker.index)  # setup() of the restarted messager + P's new link
            return
        dep.infos[worker] = ray.get(dep.actor(worker).setup.remote(), timeout=timeout)
        out = self._out_of_service(worker)
        # Elastic: the others may serve other roles than their names' (a restarted instance is
        # back in its name's role); the decode list and the router's endpoints follow that.
        refresh_roles(dep, skip=out | {worker}, timeout_s=self.probe_timeout_s)
        if dep.may_decode(worker):
            reconnect_decodes(dep, skip=out | {worker})
        if worker.role is Role.PREFILL:
            wire_prefill(dep, worker.index)
        dep.refresh_endpoints()
        endpoints = [e for e in dep.router_endpoints() if e["name"] not in out]
        ray.get(dep.router.update_endpoints.remote(endpoints), timeout=timeout)

    def _out_of_service(self, reviving: WorkerId) -> set[InstanceId]:
        """Instances the router must not be given back: those still down (but `reviving`) or
        given up, and prefill instances whose messager was given up."""
        down = (self._unrevived | self._lost) - {reviving}
        return {w.prefill if isinstance(w, MessagerId) else w for w in down} - {reviving}


def _best_effort(refs: list, timeout_s: float) -> None:
    """Wait for notifications, logging (not raising) the ones that failed."""
    for ref in refs:
        try:
            ray.get(ref, timeout=timeout_s)
        except Exception as exc:
            log.warning("supervisor: a notification failed: %s", exc)
