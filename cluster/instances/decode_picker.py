"""P's choice of a decode instance.

Fewest unanswered allocation requests first, then most free KV blocks. A healthy D answers in
milliseconds, so its count stays near zero while a stalled D's grows: the stalled one stops
attracting requests at once instead of after a timeout. Instances that timed out are avoided for
a penalty period, and instances known to lack the blocks are tried last.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass


@dataclass
class DecodePeer:
    name: str
    inbox: str
    num_blocks: int
    free_blocks: int  # as last reported by the D itself
    pending: int = 0  # allocation requests sent and not answered yet
    penalty_until: float = 0.0  # monotonic; timed-out peers are avoided until then


class DecodePicker:
    """Thread-safe: every prepare thread consults it."""

    def __init__(self, peers: list[DecodePeer], penalty_s: float) -> None:
        self._peers = {p.name: p for p in peers}
        self._penalty_s = penalty_s
        self._lock = threading.Lock()

    def set_peers(self, peers: list[DecodePeer]) -> None:
        with self._lock:
            old = self._peers
            self._peers = {p.name: old.get(p.name, p) for p in peers}

    def choose(self, blocks_needed: int, exclude: set[str]) -> DecodePeer | None:
        """The best peer not in `exclude` (penalized peers only when nothing else is left)."""
        now = time.monotonic()
        with self._lock:
            candidates = [p for p in self._peers.values() if p.name not in exclude]
            if not candidates:
                return None
            healthy = [p for p in candidates if p.penalty_until <= now] or candidates
            fits = [p for p in healthy if p.free_blocks >= blocks_needed] or healthy
            best = min(fits, key=lambda p: (p.pending, -p.free_blocks))
            best.pending += 1
            return best

    def on_reply(self, name: str, free_blocks: int) -> None:
        with self._lock:
            peer = self._peers.get(name)
            if peer is not None:
                peer.pending = max(0, peer.pending - 1)
                peer.free_blocks = free_blocks
                peer.penalty_until = 0.0

    def on_timeout(self, name: str) -> None:
        with self._lock:
            peer = self._peers.get(name)
            if peer is not None:
                peer.pending = max(0, peer.pending - 1)
                peer.penalty_until = time.monotonic() + self._penalty_s

    def snapshot(self) -> list[dict]:
        with self._lock:
            return [dict(vars(p)) for p in self._peers.values()]
