"""Keep an engine process's private memory flat under prompts of ever-new lengths.

Measured (tiny-1p1d on CPU, 6 minutes at 0.7 requests/s after a minute of warm-up): the prefill
instance's private RSS grew 815 -> 1116 MiB, ever slower, with malloc's bytes in use 191 -> 453
MiB, while the count of Python objects stayed flat and malloc_trim gave back only 43 MiB. The
growth is oneDNN's: a linear with a row count not seen before creates a primitive of about 0.4
MiB (JIT code and descriptors) that oneDNN's primitive cache and ideep's computation cache keep,
up to 1024 entries each. A prefill step has any row count up to `max_num_batched_tokens`, times
4 weight shapes; decode steps have few row counts, and the decode instance stayed flat.

- `bound_onednn_caches` (worker/models/linear.py; the oneDNN linear calls it before its first
  primitive) lowers both capacities. Disabling them is no option: a cached linear of
  one row takes 0.04 ms, creating it 0.4 ms. A prefill step that misses pays that once per
  shape (not per layer): with row counts drawn from 1..256, steps ran as fast with 256 entries
  as with 1024 (72 vs 75 ms), in 284 instead of 677 MiB.
- `MallocTrimmer`: with the caches bounded, evicted primitives leave holes between long-lived
  allocations, so the heap keeps free pages resident: RSS still crept up 0.3 MiB/s with the
  bytes in use flat, and one malloc_trim(0) at the end gave back 99 MiB. The engine loop calls
  it when idle (it takes 20-40 ms).

With both, the same run went 791 -> 860 MiB, flat after its first minute (docs/reliability.md).
"""

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
