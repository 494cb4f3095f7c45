"""How `pdserve serve` stops: signals, the drain, and the Ray processes it started.

SIGTERM (systemd, Kubernetes) and SIGINT (Ctrl-C) both start a drain: the router turns new
generation requests away with 503 and /ready false, requests in flight run to their end for up
to `router.drain_timeout_s`, and whatever is still running then ends with an error event. A
second signal skips the rest of the drain. Then the deployment stops and, when `pdserve serve`
started Ray itself, Ray stops too and no process of it is left behind.

The handlers are installed after `ray.init`: Ray's driver installs its own SIGTERM handling
(a C++ stack dump, then exit 15, leaving its agents running), and the last handler installed
wins. They only count the signal and post it to a queue (`queue.SimpleQueue.put` may be called
from a signal handler; an Event or a lock may deadlock there), so the main thread decides.
"""

from __future__ import annotations

import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import psutil

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_CALL_MARGIN_S = 15.0  # beyond the drain timeout, for the Ray calls around it
_POLL_S = 0.1
_KILLED_EXIT_S = 5.0


@dataclass(frozen=True)
class _Event:
    kind: str  # "signal" or "drained"
    detail: Any  # the signal's name, or the drain's answer (a dict, or the exception raised)


class ShutdownSignals:
    """SIGINT and SIGTERM as events the main thread waits for.

    A signal during start-up is noted and acted on once the deployment is up (then there is
    nothing to drain, and a second one stops at once): raising from the handler instead would
    land inside Ray's own calls, which turn it into a SystemError and a stack dump."""

    def __init__(self) -> None:
        self.count = 0
        self._events: queue.SimpleQueue[_Event] = queue.SimpleQueue()
        self._starting = True

    def install(self) -> None:
        """Call on the main thread, after ray.init."""
        for sig in _SIGNALS:
            signal.signal(sig, self._on_signal)

    def serving(self) -> None:
        self._starting = False

    def post(self, kind: str, detail: Any) -> None:
        self._events.put(_Event(kind, detail))

    def next_event(self, timeout_s: float | None = None) -> _Event | None:
        """The next signal or drain answer; None if `timeout_s` passed first."""
        try:
            return self._events.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def _on_signal(self, signum: int, frame: object) -> None:
        self.count += 1
        name = signal.Signals(signum).name
        self.post("signal", name)
        if self._starting:  # os.write: print() may not be re-entered from a handler
            note = f"pdserve: {name}: stopping as soon as the start-up is done\n"
            os.write(sys.stderr.fileno(), note.encode())


@dataclass(frozen=True)
class DrainOutcome:
    inflight: int  # requests still running when the drain ended (-1: unknown)
    interrupted_by: str | None = None  # the second signal, if one cut the drain short
    error: str | None = None  # why the router did not answer, if it did not

    @property
    def complete(self) -> bool:
        return self.inflight == 0 and self.interrupted_by is None


def drain(router: Any, timeout_s: float, signals: ShutdownSignals) -> DrainOutcome:
    """Ask the router actor to drain for up to `timeout_s`; a second signal cuts it short."""
    import ray

    def ask() -> None:
        try:
            answer: Any = ray.get(
                router.drain.remote(timeout_s), timeout=timeout_s + _CALL_MARGIN_S
            )
        except Exception as exc:  # a dead router: nothing left to drain there
            answer = exc
        signals.post("drained", answer)

    threading.Thread(target=ask, name="pdserve-drain", daemon=True).start()
    event = signals.next_event(timeout_s + 2 * _CALL_MARGIN_S)
    if event is None:
        return DrainOutcome(inflight=-1, error="no answer from the router")
    if isinstance(event.detail, BaseException):
        return DrainOutcome(inflight=-1, error=f"{type(event.detail).__name__}: {event.detail}")
    if event.kind == "signal":
        return DrainOutcome(inflight=-1, interrupted_by=event.detail)
    return DrainOutcome(inflight=int(event.detail["inflight"]))


class ChildProcesses:
    """Every process started under this one (an embedded Ray's gcs_server, raylet, agents and
    workers), remembered by identity so a recycled pid is never touched."""

    def __init__(self) -> None:
        self._seen: dict[int, psutil.Process] = {}

    def snapshot(self) -> None:
        for proc in psutil.Process().children(recursive=True):
            self._seen.setdefault(proc.pid, proc)

    def reap(self, timeout_s: float) -> list[str]:
        """Wait up to `timeout_s` for them to exit, then kill the rest. Returns what was
        killed ("name[pid]")."""
        killed = []
        for proc in self._wait_gone(timeout_s):
            try:
                killed.append(f"{proc.name()}[{proc.pid}]")
                proc.kill()
            except psutil.Error:  # exited meanwhile
                pass
        self._wait_gone(_KILLED_EXIT_S)
        return killed

    def _wait_gone(self, timeout_s: float) -> list[psutil.Process]:
        """Those still running after up to `timeout_s`. They are Ray's children, not ours, so
        there is no wait() for them: poll."""
        deadline = time.monotonic() + timeout_s
        alive = self._alive()
        while alive and time.monotonic() < deadline:
            time.sleep(_POLL_S)
            alive = self._alive()
        return alive

    def _alive(self) -> list[psutil.Process]:
        return [p for p in self._seen.values() if _running(p)]


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
