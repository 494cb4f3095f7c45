"""The thread that drives one instance's engine; other threads hand it work under its lock."""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable

from cluster.instances.cache_reports import CacheReporter
from cluster.instances.memory import MallocTrimmer
from engine.batch import SchedulerOutput
from engine.outputs import TokenDelta
from engine.request import RequestStatus
from worker.engine_core import EngineCore

log = logging.getLogger(__name__)


class EngineLoop:
    """Steps the engine while there is work; sleeps on an event (with a tick) when idle.

    `lock` guards the scheduler: hold it for short mutations only (never across a forward pass).
    Hooks: `before_execute(sched)` runs before the forward (P announces the step to its cache
    messager), `after_step(sched, deltas)` publishes results, `tick()` runs every iteration
    (deadlines, queued events) and `on_failure(sched, error)` ends the requests of a failed step.
    With `core.overlap` the loop schedules and launches step N before saving step N-1, so
    `after_step` gets step N-1 and its deltas (always the step whose output was saved).
    """

    def __init__(
        self,
        core: EngineCore,
        after_step: Callable[[SchedulerOutput, list[TokenDelta]], None],
        tick: Callable[[], None] = lambda: None,
        before_execute: Callable[[SchedulerOutput], None] = lambda sched: None,
        on_failure: Callable[[SchedulerOutput, str], None] | None = None,
        idle_wait_s: float = 0.2,
        name: str = "engine",
    ) -> None:
        self.core = core
        self.lock = core.lock  # guards the scheduler and block manager
        self._after_step = after_step
        self._tick = tick
        self._before_execute = before_execute
        self._on_failure = on_failure
        self._idle_wait_s = idle_wait_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.steps = 0
        self.failed_steps = 0
        self.trimmer = MallocTrimmer()
        self.heartbeat = time.monotonic()  # of the last round, for the supervisor
        self.reporter: CacheReporter | None = None  # prefix-cache reports to the routers

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s)

    def wake(self) -> None:
        self._wake.set()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def heartbeat_age_s(self) -> float:
        return time.monotonic() - self.heartbeat

    def _run(self) -> None:
        while not self._stop.is_set():
            self.heartbeat = time.monotonic()
            self._tick()
            if self.reporter is not None:
                with self.lock:
                    self.reporter.tick()
            with self.lock:
                sched = self.core.scheduler.schedule()
            idle = sched.is_empty and self.core.in_flight is None
            self.trimmer.maybe_trim(idle)
            if idle:
                self._wake.wait(self._idle_wait_s)
                self._wake.clear()
                continue
            self._run_step(sched)

    def _run_step(self, sched: SchedulerOutput) -> None:
        try:
            if not sched.is_empty:
                self._before_execute(sched)
            ready = self.core.execute_and_save(sched)  # overlap: `ready` is the step before
            if ready is None:
                return
            done, result = ready
            with self.lock:
                deltas = self.core.scheduler.update_from_output(done, result)
            self._after_step(done, deltas)
            self.steps += 1
        except Exception:  # a failed step ends its requests (and the step in flight's)
            self.failed_steps += 1
            error = traceback.format_exc(limit=5)
            log.error("engine step failed:\n%s", error)
            message = error.strip().splitlines()[-1]
            in_flight = self.core.drop_in_flight()
            for failed in (sched, None if in_flight is sched else in_flight):
                if failed is not None and not failed.is_empty:
                    self._fail_step(failed, message)

    def _fail_step(self, sched: SchedulerOutput, error: str) -> None:
        with self.lock:
            # The failed step no longer runs: blocks it held may be reused.
            self.core.block_manager.step_done(sched.step_id)
            for chunk in sched.chunks:
                self.core.scheduler.abort_request(chunk.request_id, RequestStatus.FINISHED_ERROR)
        if self._on_failure is not None:
            self._on_failure(sched, error)
