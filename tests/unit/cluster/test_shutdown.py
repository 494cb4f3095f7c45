"""The signal handling and process reaping of `pdserve serve` (cluster/shutdown.py), without Ray."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

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
    children = ChildProcesses()
    for _ in range(400):  # the grandchild appears once the child has started it
        children.snapshot()
        if len(children._alive()) == 2:
            break
        time.sleep(0.05)
    assert len(children._alive()) == 2
    killed = children.reap(0.2)
    parent.wait(10)
    assert len(killed) == 2 and any(name.startswith("sleep[") for name in killed), killed
    assert children._alive() == []
