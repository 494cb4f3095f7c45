"""The signal handling and process reaping of `pdserve serve` (cluster/shutdown.py), without Ray."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import psutil
import pytest

from cluster.shutdown import ChildProcesses, ShutdownSignals


@pytest.fixture
def signals() -> Iterator[ShutdownSignals]:
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    handler = ShutdownSignals()
    handler.install()
    yield handler
    for sig, previous in saved.items():
        signal.signal(sig, previous)


def test_a_signal_while_starting_waits_for_the_start(signals: ShutdownSignals, capfd) -> None:
    os.kill(os.getpid(), signal.SIGTERM)  # the handler runs right after this call
    assert "SIGTERM: stopping as soon as the start-up is done" in capfd.readouterr().err
    signals.serving()
    event = signals.next_event(5)
    assert (event.kind, event.detail) == ("signal", "SIGTERM")


def test_signals_while_serving_are_posted_in_order(signals: ShutdownSignals) -> None:
    signals.serving()
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGINT)
    first, second = signals.next_event(5), signals.next_event(5)
    assert (first.kind, first.detail) == ("signal", "SIGTERM")
    assert (second.kind, second.detail) == ("signal", "SIGINT")
    assert signals.next_event(0.01) is None
    signals.post("drained", {"inflight": 0})
    assert signals.next_event(5).detail == {"inflight": 0}


def test_reap_kills_what_outlives_its_grace() -> None:
    code = "import subprocess, sys, time; subprocess.Popen(['sleep', '60']); time.sleep(60)"
    parent = subprocess.Popen([sys.executable, "-c", code])
    sleep_pid = _wait_for_grandchild(parent.pid, "sleep")
    children = ChildProcesses()
    children.snapshot()
    # Only this test's two: pytest may have other children (a resource tracker) in a full run.
    ours = {parent.pid, sleep_pid}
    children._seen = {pid: proc for pid, proc in children._seen.items() if pid in ours}
    assert len(children._alive()) == 2
    killed = children.reap(0.2)
    parent.wait(10)
    # By pid: a name read while the grandchild was still between fork and exec says "python".
    assert len(killed) == 2 and any(name.endswith(f"[{sleep_pid}]") for name in killed), killed
    assert children._alive() == []


def _wait_for_grandchild(pid: int, name: str, timeout_s: float = 20.0) -> int:
    """The pid of `pid`'s child once it runs `name` (it appears when the child has exec'd it)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for proc in psutil.Process(pid).children():
            with contextlib.suppress(psutil.Error):
                if proc.name() == name:
                    return proc.pid
        time.sleep(0.05)
    raise AssertionError(f"no {name} under pid {pid} within {timeout_s:.0f} s")
