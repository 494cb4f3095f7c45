"""The driver's watchdog over its ranks (see worker/tp_runner.py).

It owns the status socket the ranks report to and does the blocking waits; it only posts what
it learns (ready ranks, the group's first failure) to queues and to a one-way flag the driver
reads, and aborts the process group so a collective blocked on a dead peer returns.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable

import zmq

from engine.errors import PdserveError
from worker.tp_worker import STATUS_ERROR, STATUS_READY, decode_status

log = logging.getLogger(__name__)

_WATCH_INTERVAL_MS = 500
_EXIT_TP_FAILED = 70  # EX_SOFTWARE


class TensorParallelError(PdserveError, RuntimeError):
    """The instance's tensor-parallel group failed; the instance must be restarted."""


class StepClock:
    """Steps launched and not yet saved, and when the oldest began. Written by the driver's
    thread only; the watchdog only reads (single attribute reads)."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.oldest_start = 0.0

    def begin(self) -> None:
        if self.in_flight == 0:
            self.oldest_start = time.monotonic()
        self.in_flight += 1

    def end(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)
        self.oldest_start = time.monotonic()  # the next one began no earlier than this

    def overdue(self, limit_s: float) -> bool:
        return self.in_flight > 0 and time.monotonic() - self.oldest_start > limit_s


class RankWatchdog(threading.Thread):
    """Owns the status socket: collects ready reports, and turns a rank's error report, a dead
    rank or an overdue step into the group's failure (then aborts the group)."""

    def __init__(
        self,
        status: zmq.Socket,
        ranks: list,
        clock: StepClock,
        limit_s: float,
        exit_on_failure: bool = False,
    ):
        super().__init__(name="pdserve-tp-watchdog", daemon=True)
        self._status = status
        self._ranks = ranks
        self._clock = clock
        self._limit_s = limit_s
        self._ready: queue.Queue[tuple[int, dict | None]] = queue.Queue()
        self._failures: queue.Queue[str] = queue.Queue()
        self._stop_event = threading.Event()
        self.failure: str | None = None
        self.stopping = False
        self.abort: Callable[[], None] = lambda: None
        self.exit_on_failure = exit_on_failure

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                self._watch_once()
        finally:
            self._status.close(linger=0)

    def _watch_once(self) -> None:
        if self._status.poll(_WATCH_INTERVAL_MS):
            kind, rank, text, kv_handle = decode_status(self._status.recv())
            if kind == STATUS_READY:
                self._ready.put((rank, kv_handle))
            elif kind == STATUS_ERROR:
                self.fail(f"rank {rank}: {text}")
        if self.stopping:
            return
        for handle in self._ranks:
            if not handle.alive():
                self.fail(handle.describe())
        if self._clock.overdue(self._limit_s):
            self.fail(f"a step did not complete within {self._limit_s:g} s")

    def fail(self, reason: str) -> None:
        if self.failure is not None:
            return
        self.failure = reason
        self._failures.put(reason)
        log.error("tensor-parallel instance failed: %s", reason)
        try:
            self.abort()
        except Exception:  # the group may be half torn down already
            log.exception("aborting the tensor-parallel group failed")
        if self.exit_on_failure:  # the deployment restarts the instance and its ranks
            logging.shutdown()
            os._exit(_EXIT_TP_FAILED)

    def wait_failure(self, timeout_s: float) -> str | None:
        if self.failure is not None:
            return self.failure
        try:
            return self._failures.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def wait_ready(self, count: int, timeout_s: float) -> dict[int, dict | None]:
        """Each rank's shared KV handle (None where it shares none), once all are ready."""
        handles: dict[int, dict | None] = {}
        deadline = time.monotonic() + timeout_s
        for _ in range(count):
            while True:
                if self.failure is not None:
                    raise TensorParallelError(f"a rank failed to start: {self.failure}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TensorParallelError(f"ranks not ready within {timeout_s:g} s")
                try:
                    rank, handle = self._ready.get(timeout=min(remaining, 0.5))
                    handles[rank] = handle
                    break
                except queue.Empty:
                    continue
        return handles

    def stop(self) -> bool:
        """Stop watching; True once the thread has ended (and closed its socket)."""
        self._stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(10 * _WATCH_INTERVAL_MS / 1000)
        return not self.is_alive()
