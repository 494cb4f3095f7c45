"""Started streams wait for KV capacity instead of failing (router.capacity_wait_s).

When no decode instance has free blocks (or sequence slots) for a request, its prefill instance
ends it as "overloaded". For a new request that is a 503 with Retry-After: the client has seen
nothing and may try again. A stream that has already released tokens, or that was moved after a
failure (migration), cannot be retried by its client without seeing an error; that is what
happens while a killed decode instance restarts and the survivor is full. So the router parks
such a stream, holding nothing on any instance (the refusal freed P's blocks, D allocated none),
and sends it again after a backoff (`BACKOFF_FIRST_S`, doubling up to `BACKOFF_MAX_S`) until
capacity comes back or `capacity_wait_s` has passed since its last token; only then does the
refusal reach the client. While any stream waits (parked, or sent again and without a token
yet), new requests get 503 (see `Dispatcher.check_capacity`): blocks that free up go to streams
already under way first.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from cluster.router.streams import RequestStream

BACKOFF_FIRST_S = 0.2
BACKOFF_MAX_S = 2.0


@dataclass
class _Wait:
    attempt: int  # the stream's attempt when it was parked (a move since makes the timer moot)
    error: str  # the refusal, which the client gets if the wait runs out
    timer: asyncio.TimerHandle | None = None


class CapacityWaits:
    """The parked streams of one router event loop. `resend(stream, why)` sends a stream again
    (its next attempt) and says whether it could."""

    def __init__(self, budget_s: float, resend: Callable[[RequestStream, str], bool]) -> None:
        self._budget_s = budget_s
        self._resend = resend
        self._waiting: dict[RequestStream, _Wait] = {}
        self._since: dict[RequestStream, float] = {}  # first refusal since the last token
        self.parks = 0  # refusals turned into a wait (for stats)
        self.expired = 0  # waits that ran out: the refusal reached the client

    @property
    def waiting(self) -> int:
        """Streams refused since their last token: parked, or sent again and not served yet
        (new requests are held back until this is 0, so they cannot take the blocks a resent
        stream is about to ask for)."""
        return len(self._since)

    def is_parked(self, stream: RequestStream) -> bool:
        """Waiting for its timer: it holds nothing on any instance."""
        return stream in self._waiting

    def park(self, stream: RequestStream, error: str) -> bool:
        """Take a refused stream to send again later. False when the refusal should reach the
        client now: a request that never started and was never moved (a plain 503), or a
        stream whose wait since its last token has used up `capacity_wait_s`."""
        if stream in self._waiting:
            return True  # a duplicate of the refusal it waits after
        if not (stream.output_ids or stream.attempt):
            return False
        now = time.monotonic()
        since = self._since.setdefault(stream, now)
        if now - since >= self._budget_s:
            self.expired += 1
            self._since.pop(stream, None)
            return False
        delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2**stream.capacity_retries)
        delay = min(delay, since + self._budget_s - now)  # the last try comes at the deadline
        wait = _Wait(stream.attempt, error)
        wait.timer = asyncio.get_running_loop().call_later(delay, self._due, stream)
        self._waiting[stream] = wait
        self.parks += 1
        return True

    def progressed(self, stream: RequestStream) -> None:
        """Tokens arrived: a later refusal gets a fresh `capacity_wait_s`."""
        self._since.pop(stream, None)

    def forget(self, stream: RequestStream) -> None:
        """The stream ended (released): no resend."""
        self._since.pop(stream, None)
        wait = self._waiting.pop(stream, None)
        if wait is not None and wait.timer is not None:
            wait.timer.cancel()

    def close(self) -> None:
        for stream in list(self._waiting):
            self.forget(stream)
        self._since.clear()

    def _due(self, stream: RequestStream) -> None:
        wait = self._waiting.pop(stream, None)
        if wait is None or stream.finish is not None or stream.attempt != wait.attempt:
            return  # ended or moved meanwhile (e.g. failed by a drain)
        stream.capacity_retries += 1
        if not self._resend(stream, f"waited for capacity: {wait.error}"):
            self._since.pop(stream, None)
            stream.fail("overloaded", wait.error)
