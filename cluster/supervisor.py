"""Keeps a deployment whole: notices crashed actors, tells the survivors, re-wires the restarted.

Ray restarts a crashed instance or messager actor (`cluster.restart_crashed_actors`), running
its constructor again. The supervisor, a thread in the process that deployed, checks every
actor each `cluster.health_check_interval_s`. When one has died it
1. tells the others at once: prefill instances and messagers stop sending to a dead decode
   instance (their requests for it end with an error), and the router fails or retries the
   requests that instance held, so no client waits for a deadline;
2. waits for Ray to restart the actor, calls its `setup()` again and wires it back in (new
   inbox and transfer endpoint; a restarted prefill instance gets its messager re-attached).
An actor that does not answer in time but has not died (e.g. stalled) is left to the request
deadlines: restarting it would race with work it may still finish.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

from engine.config import Role
from engine.protocol.identity import InstanceId, MessagerId, WorkerId

if TYPE_CHECKING:
    from cluster.launcher import Deployment

log = logging.getLogger(__name__)


class Supervisor:
    def __init__(self, dep: Deployment, probe_timeout_s: float = 10.0) -> None:
        self.dep = dep
        self.interval_s = dep.config.cluster.health_check_interval_s
        self.probe_timeout_s = probe_timeout_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pdserve-supervisor", daemon=True)
        self.recoveries: list[str] = []  # names revived, in order (for tests and logs)
        self._unrevived: set[WorkerId] = set()  # died, not wired in yet: retried each round

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.probe_timeout_s + 1)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            for name in self.dep.workers():
                if self._stop.is_set():
                    return
                try:
                    if name in self._unrevived or self._died(name):
                        self._recover(name)
                except Exception:  # the watch must go on whatever one check does
                    log.exception("supervisor: checking %s failed", name)

    def _died(self, name: WorkerId) -> bool:
        try:
            ray.get(self.dep.actor(name).is_ready.remote(), timeout=self.probe_timeout_s)
            return False
        except GetTimeoutError:
            log.warning("supervisor: %s did not answer in %.0f s", name, self.probe_timeout_s)
            return False
        except RayActorError:
            return True

    def _recover(self, name: WorkerId) -> None:
        if name not in self._unrevived:
            log.warning("supervisor: %s died; failing its requests, awaiting its restart", name)
            self._announce_down(name)
            self._unrevived.add(name)
        try:
            self._revive(name)
        except (ActorUnavailableError, RayActorError, GetTimeoutError) as exc:
            log.info("supervisor: %s not back yet: %s", name, type(exc).__name__)
            return  # still restarting: next round
        except Exception as exc:  # setup itself failed: try again next round, keep serving
            log.error("supervisor: %s could not be revived: %s", name, exc)
            return
        self._unrevived.discard(name)
        self.recoveries.append(str(name))
        log.warning("supervisor: %s is back", name)

    def _announce_down(self, name: WorkerId) -> None:
        dep = self.dep
        calls = []
        if isinstance(name, InstanceId) and name.role is Role.DECODE:
            calls += [p.decode_down.remote(name) for p in dep.prefills]
            calls += [m.decode_down.remote(name) for m in dep.messagers]
        if isinstance(name, InstanceId):
            calls.append(dep.router.instance_down.remote(name))
        _best_effort(calls, self.probe_timeout_s)

    def _revive(self, name: WorkerId) -> None:
        from cluster.launcher import reconnect_decodes, wire_prefill

        dep = self.dep
        timeout = dep.config.cluster.startup_timeout_s
        if isinstance(name, MessagerId):
            wire_prefill(dep, name.index)  # setup() of the restarted messager + P's new link
            return
        dep.infos[name] = ray.get(dep.actor(name).setup.remote(), timeout=timeout)
        if name.role is Role.DECODE:
            reconnect_decodes(dep)
        elif name.role is Role.PREFILL:
            wire_prefill(dep, name.index)
        dep.endpoints = [dep.infos[i] for i in dep.ids(Role.PREFILL, Role.DECODE, Role.MIXED)]
        endpoints = [
            {"name": e["name"], "role": e["role"], "inbox": e["inbox"]} for e in dep.endpoints
        ]
        ray.get(dep.router.update_endpoints.remote(endpoints), timeout=timeout)


def _best_effort(refs: list, timeout_s: float) -> None:
    """Wait for notifications, logging (not raising) the ones that failed."""
    for ref in refs:
        try:
            ray.get(ref, timeout=timeout_s)
        except Exception as exc:
            log.warning("supervisor: a notification failed: %s", exc)
