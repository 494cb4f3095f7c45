"""P's choice of a decode instance.

Not suspect first (an ask unanswered for longer than a healthy D takes), then fewest
unanswered allocation requests, then most free KV blocks. A healthy D answers in
milliseconds, so its count stays near zero while a stalled D's grows: the stalled one stops
attracting requests at once instead of after a timeout. Instances that timed out are avoided for
a penalty period, and instances known to lack the blocks are tried last.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from engine.protocol.identity import InstanceId


@dataclass
class DecodePeer:
    name: InstanceId
    inbox: str
    num_blocks: int
    free_blocks: int  # as last reported by the D itself
    pending_since: list[float] = field(default_factory=list)  # send times of unanswered asks
    penalty_until: float = 0.0  # monotonic; timed-out peers are avoided until then
    timeouts_in_a_row: int = 0  # each doubles the penalty; an answer resets it

    def suspect(self, now: float, after_s: float) -> bool:
        """An ask has gone unanswered for longer than a healthy D ever takes."""
        return bool(self.pending_since) and now - self.pending_since[0] > after_s


class DecodePicker:
    """Owned by the prefill instance's loop (prepare workers never consult it)."""

    def __init__(self, peers: list[DecodePeer], penalty_s: float, suspect_after_s: float) -> None:
        self._peers = {p.name: p for p in peers}
        self._penalty_s = penalty_s
        self._suspect_after_s = suspect_after_s

    def set_peers(self, peers: list[DecodePeer]) -> None:
        """Replace the peer list; a peer keeps its load history unless its inbox changed (a
        restarted instance starts afresh)."""
        old = self._peers
        self._peers = {
            p.name: old[p.name] if p.name in old and old[p.name].inbox == p.inbox else p
            for p in peers
        }

    def remove(self, name: InstanceId) -> None:
        self._peers.pop(name, None)

    def choose(
        self, blocks_needed: int, exclude: set[InstanceId], prefer: InstanceId | None = None
    ) -> DecodePeer | None:
        """The best peer not in `exclude` (penalized peers only when nothing else is left).
        `prefer` (the router's cache-aware choice: it holds a prefix of the prompt, so it may
        need fewer blocks than `blocks_needed`) wins unless it is penalized or suspect."""
        now = time.monotonic()
        candidates = [p for p in self._peers.values() if p.name not in exclude]
        if not candidates:
            return None
        healthy = [p for p in candidates if p.penalty_until <= now] or candidates
        fits = [p for p in healthy if p.free_blocks >= blocks_needed] or healthy
        preferred = self._peers.get(prefer) if prefer is not None else None
        if preferred in healthy and not preferred.suspect(now, self._suspect_after_s):
            fits = [preferred]

        def order(p: DecodePeer) -> tuple[bool, int, int]:
            return p.suspect(now, self._suspect_after_s), len(p.pending_since), -p.free_blocks

        best = min(fits, key=order)
        best.pending_since.append(now)
        return best

    def abandon(self, name: InstanceId) -> DecodePeer | None:
        """An ask that ended without an answer from the peer (e.g. aborted)."""
        peer = self._peers.get(name)
        if peer is not None and peer.pending_since:
            peer.pending_since.pop(0)
        return peer

    def on_reply(self, name: InstanceId, free_blocks: int) -> None:
        peer = self.abandon(name)
        if peer is not None:
            peer.free_blocks = free_blocks
            peer.penalty_until = 0.0
            peer.timeouts_in_a_row = 0

    def on_timeout(self, name: InstanceId) -> None:
        peer = self.abandon(name)
        if peer is not None:
            backoff = self._penalty_s * 2 ** min(peer.timeouts_in_a_row, 5)
            peer.timeouts_in_a_row += 1
            peer.penalty_until = time.monotonic() + backoff

    def snapshot(self) -> list[dict]:
        return [
            {
                "name": str(p.name),
                "inbox": p.inbox,
                "free_blocks": p.free_blocks,
                "pending": len(p.pending_since),
                "penalized": p.penalty_until > time.monotonic(),
            }
            for p in self._peers.values()
        ]
