"""Per-request token ordering: tokens reach the router from two senders (P sends the first, D the
rest) over separate sockets, so an item can overtake an earlier one, and a retried send can repeat
one. Each item says where its tokens sit in the output (`first_index`); this class turns items in
any order into the output in order, exactly once. Logprobs, when an item carries them, travel with
their tokens."""

from __future__ import annotations

from dataclasses import dataclass

from engine.outputs import TokenLogprobs
from engine.protocol.tokens import TokenItem

# Reasons that end a request at once: the missing tokens before them may never come.
_IMMEDIATE_FINISH = frozenset({"abort", "error"})


@dataclass(frozen=True)
class Finish:
    reason: str  # stop | length | abort | error
    error: str | None = None


class TokenOrderer:
    """Accepts `TokenItem`s of one request in any order; releases tokens in output order."""

    def __init__(self, keep_logprobs: bool = False) -> None:
        self.keep_logprobs = keep_logprobs
        self.next_index = 0  # index of the next token to release
        self.duplicates = 0  # tokens seen twice (dropped)
        # index -> (token id, its logprobs or None), for indices > next_index
        self._pending: dict[int, tuple[int, TokenLogprobs | None]] = {}
        # Logprobs of the tokens released so far and not taken yet (None where an item had none).
        self._released_logprobs: list[TokenLogprobs | None] = []
        self._finish_at: int | None = None  # output length at which `_finish` applies
        self._finish: Finish | None = None
        self.finished: Finish | None = None  # set once the finish has been released

    def add(self, item: TokenItem) -> list[int]:
        """Record `item`; return the tokens that are now next in order (possibly none).
        After this returns, `finished` is set if the request has ended; with keep_logprobs, the
        logprobs of the released tokens wait in `take_logprobs()`."""
        if self.finished is not None:
            self.duplicates += len(item.token_ids)
            return []
        logprobs = item.logprobs
        for offset, token_id in enumerate(item.token_ids):
            index = item.first_index + offset
            if index < self.next_index or index in self._pending:
                self.duplicates += 1
            else:
                token_logprobs = logprobs[offset] if logprobs and offset < len(logprobs) else None
                self._pending[index] = (token_id, token_logprobs)
        if item.finish_reason is not None:
            self._record_finish(item)
        return self._release()

    def _record_finish(self, item: TokenItem) -> None:
        finish = Finish(item.finish_reason or "", item.error)
        if finish.reason in _IMMEDIATE_FINISH:
            self._finish, self._finish_at = finish, -1
        elif self._finish is None:
            self._finish, self._finish_at = finish, item.first_index + len(item.token_ids)

    def forget_pending(self) -> None:
        """Drop tokens held back behind a gap, and an end not reached yet: the request goes on
        in a new run (migration) that will produce them again."""
        assert self.finished is None, "a finished request does not move"
        self._pending.clear()
        self._finish = self._finish_at = None

    def take_logprobs(self) -> list[TokenLogprobs | None]:
        """Logprobs of the tokens `add` released since the last call, aligned with them."""
        taken, self._released_logprobs = self._released_logprobs, []
        return taken

    def _release(self) -> list[int]:
        out: list[int] = []
        while self.next_index in self._pending and not self._finish_reached():
            token_id, logprobs = self._pending.pop(self.next_index)
            out.append(token_id)
            if self.keep_logprobs:
                self._released_logprobs.append(logprobs)
            self.next_index += 1
        if self._finish is not None and self._finish_reached():
            self.finished = self._finish
            self._pending.clear()  # tokens past a finish are never shown
        return out

    def _finish_reached(self) -> bool:
        return self._finish_at is not None and self.next_index >= self._finish_at
