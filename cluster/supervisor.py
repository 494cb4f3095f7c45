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
"""

from __future__ import annotations

import enum
import logging
import threading

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

from cluster.deployment import Deployment, reconnect_decodes, wire_prefill
from engine.config import Role
from engine.protocol.identity import InstanceId, MessagerId, WorkerId

log = logging.getLogger(__name__)


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

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.probe_timeout_s + 1)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.check_all()

    def check_all(self) -> None:
        """One round over every actor."""
        for worker in self.dep.workers():
            if self._stop.is_set():
                return
            try:
                self._check(worker)
            except Exception:  # the watch must go on whatever one check does
                log.exception("supervisor: checking %s failed", worker)

    def _check(self, worker: WorkerId) -> None:
        if worker in self._unrevived:
            self._recover(worker)
            return
        health = self._probe(worker)
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
        try:
            self._revive(worker)
        except (ActorUnavailableError, RayActorError, GetTimeoutError) as exc:
            log.info("supervisor: %s not back yet: %s", worker, type(exc).__name__)
            return  # still restarting: next round
        except Exception as exc:  # setup itself failed: try again next round, keep serving
            log.error("supervisor: %s could not be revived: %s", worker, exc)
            return
        self._unrevived.discard(worker)
        self.recoveries.append(str(worker))
        log.warning("supervisor: %s is back", worker)

    def _announce_down(self, worker: WorkerId) -> None:
        dep = self.dep
        calls = []
        if isinstance(worker, InstanceId) and worker.role is Role.DECODE:
            calls += [p.decode_down.remote(worker) for p in dep.prefills]
            calls += [m.decode_down.remote(worker) for m in dep.messagers]
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
        if worker.role is Role.DECODE:
            reconnect_decodes(dep)
        elif worker.role is Role.PREFILL:
            wire_prefill(dep, worker.index)
        dep.refresh_endpoints()
        ray.get(dep.router.update_endpoints.remote(dep.router_endpoints()), timeout=timeout)


def _best_effort(refs: list, timeout_s: float) -> None:
    """Wait for notifications, logging (not raising) the ones that failed."""
    for ref in refs:
        try:
            ray.get(ref, timeout=timeout_s)
        except Exception as exc:
            log.warning("supervisor: a notification failed: %s", exc)
