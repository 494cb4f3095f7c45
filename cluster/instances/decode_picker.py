"""P's choice of a decode instance: most free KV blocks after pending reservations, skipping
instances that recently timed out (so one stalled D does not keep absorbing requests)."""

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
            best = max(healthy, key=lambda p: p.free_blocks - p.pending * blocks_needed)
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
