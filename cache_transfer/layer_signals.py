"""A prefill instance's ordered line to its cache messager, aware of when the GPU wrote KV.

On CPU a layer's KV is in memory when the model's layer hook runs, so everything is sent at once
from the loop thread. On a GPU the hook runs when the layer's kernels are queued: the link
records a CUDA event behind them, and its sender thread waits for each event before it signals,
so the messager never reads KV the GPU has not written. Everything goes through that one FIFO,
so a layer signal never overtakes its step's plan.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

# How long one layer's kernels may take before the signal is given up (the request's transfer
# then fails through P's transfer deadline). Far above any real layer time.
LAYER_EVENT_TIMEOUT_S = 60.0
# Waiting on an event: spin this long (a layer often finishes within it), then sleep in steps.
_SPIN_S = 0.0002
_SLEEP_S = 0.00005
_STOP = object()


class MessagerLink:
    """`send(msg)` in order; `layer_written(msg)` once the KV queued so far is in memory."""

    def __init__(self, send: Callable[[Any], None], device: torch.device, name: str) -> None:
        self._send = send
        self._gpu = device.type == "cuda"
        self._queue: queue.SimpleQueue[tuple[torch.cuda.Event | None, Any]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.dropped_signals = 0
        if self._gpu:
            self._thread = threading.Thread(target=self._run, name=f"{name}-link", daemon=True)
            self._thread.start()

    def send(self, msg: Any) -> None:
        """Send after everything sent before it."""
        if self._gpu:
            self._queue.put((None, msg))
        else:
            self._send(msg)

    def layer_written(self, msg: Any) -> None:
        """Send once the device work queued so far on this thread's stream has finished."""
        if not self._gpu:
            self._send(msg)
            return
        event = torch.cuda.Event()
        event.record()
        self._queue.put((event, msg))

    def close(self, timeout_s: float = 5.0) -> None:
        if self._thread is not None:
            self._queue.put((None, _STOP))
            self._thread.join(timeout_s)
            self._thread = None

    def _run(self) -> None:
        while True:
            event, msg = self._queue.get()
            if msg is _STOP:
                return
            try:
                if event is not None and not wait_event(event, LAYER_EVENT_TIMEOUT_S):
                    self.dropped_signals += 1
                    log.error(
                        "GPU layer did not finish in %.0f s; signal dropped", LAYER_EVENT_TIMEOUT_S
                    )
                    continue
                self._send(msg)
            except Exception:  # a broken CUDA context: later signals fail the same way
                self.dropped_signals += 1
                log.exception("messager link: signal dropped")


def wait_event(event: torch.cuda.Event, timeout_s: float) -> bool:
    """Whether `event` completed within `timeout_s` (spin briefly, then poll with short sleeps:
    a blocking synchronize has no deadline)."""
    start = time.monotonic()
    deadline = start + timeout_s
    while not event.query():
        now = time.monotonic()
        if now > deadline:
            return False
        if now - start > _SPIN_S:
            time.sleep(_SLEEP_S)
    return True
