"""`MallocTrimmer`: keeps an engine process's private memory flat under prompts of ever-new
lengths. oneDNN's per-shape caches are bounded in worker/models/linear.py; the primitives they
evict leave holes between long-lived allocations, so the heap keeps free pages resident until
malloc_trim gives them back. An instance's loop calls it when idle (it takes 20-40 ms).
Measurements in docs/reliability.md."""

from __future__ import annotations

import ctypes
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


class MallocTrimmer:
    """Calls malloc_trim(0) when the engine is idle, at most every `idle_interval_s`, and
    between steps when the engine has not been idle for `busy_interval_s`."""

    def __init__(
        self,
        idle_interval_s: float = 10.0,
        busy_interval_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        trim: Callable[[int], int] | None = None,
    ) -> None:
        self._idle_interval_s = idle_interval_s
        self._busy_interval_s = busy_interval_s
        self._clock = clock
        self._trim = trim if trim is not None else _malloc_trim()
        self._last = clock()
        self.trims = 0

    def maybe_trim(self, idle: bool) -> bool:
        """Trim if it is time; True if it trimmed."""
        if self._trim is None:
            return False
        since = self._clock() - self._last
        if since < (self._idle_interval_s if idle else self._busy_interval_s):
            return False
        self._trim(0)
        self._last = self._clock()
        self.trims += 1
        return True
