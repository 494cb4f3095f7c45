"""The prefill instance's prepare pool: threads that do only the blocking part of a preparation.

The loop reserves P's blocks, chooses a D and hands an idle worker one `Ask`: send the
`DecodeTask` and wait for D's `DecodeAllocation` up to `prefill.allocation_timeout_s`. D answers
on the worker's own inbox, so the wait does not depend on P's current step, and a slow D holds
only the worker that asked it. The worker posts an `Answer` to the loop, which decides what
next; an abort reaches the worker as an `AbortRequest` on its inbox. On a timeout or an abort
the worker cancels the ask on the task's socket (D sees the cancel after the task); an answer
after that is reported as late.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from engine.protocol.channels import ChannelError, Inbox, Mailbox, SenderPool
from engine.protocol.requests import AbortRequest
from engine.protocol.splitwise import CancelDecode, DecodeAllocation, DecodeTask

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ask:
    """Ask decode instance `peer` (at `peer_inbox`) to allocate for `task`."""

    peer: str
    peer_inbox: str
    task: DecodeTask
    timeout_s: float

    @property
    def request_id(self) -> str:
        return self.task.request_id


@dataclass(frozen=True)
class Answer:
    """A worker's result for the loop. Without `reply`, `why` says what happened instead:
    timeout, unreachable, aborted, or an internal error. `late`: a reply nobody waited for."""

    request_id: str
    peer: str
    worker: PrepareWorker
    reply: DecodeAllocation | None = None
    why: str = ""
    late: bool = False


class PrepareWorker(threading.Thread):
    """One thread of the pool; idle until the loop `submit`s an Ask (only when it is idle)."""

    def __init__(self, host: str, hand_back: Callable[[Answer], None], name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.inbox = Inbox(host, accept=(DecodeAllocation, AbortRequest), name=name)
        self._jobs = Mailbox(beside=self.inbox)
        self._hand_back = hand_back
        self._senders = SenderPool()

    def submit(self, ask: Ask) -> None:
        self._jobs.put(ask)

    def stop(self, timeout_s: float = 5.0) -> None:
        self._jobs.put(None)
        self.join(timeout_s)
        self.inbox.close()
        self._senders.close()
        self._jobs.close()

    def run(self) -> None:
        while True:
            self._jobs.wait(None)
            for ask in self._jobs.take_all():  # before the inbox: an abort may follow its ask
                if ask is None:
                    return
                try:
                    reply, why = self._ask(ask)
                except Exception as exc:  # a bug here must not end the thread or lose the ask
                    log.exception("preparing %s failed", ask.request_id)
                    reply, why = None, f"internal: {exc}"
                self._hand_back(Answer(ask.request_id, ask.peer, self, reply, why))
            for msg in self.inbox.drain():
                self._late(msg)

    def _ask(self, ask: Ask) -> tuple[DecodeAllocation | None, str]:
        """D's reply, or None and why there is none."""
        try:
            self._senders.send(ask.peer_inbox, ask.task)
        except ChannelError:
            return None, "unreachable"
        deadline = time.monotonic() + ask.timeout_s
        while (left := deadline - time.monotonic()) > 0:
            msg = self.inbox.recv(left)
            if isinstance(msg, AbortRequest) and msg.request_id == ask.request_id:
                self._cancel(ask, "aborted while preparing")
                return None, "aborted"
            is_reply = isinstance(msg, DecodeAllocation) and msg.decode_instance == ask.peer
            if is_reply and msg.request_id == ask.request_id:
                return msg, ""
            self._late(msg)
        self._cancel(ask, "allocation reply timed out")  # in case it answers later
        return None, "timeout"

    def _late(self, msg: DecodeAllocation | AbortRequest | None) -> None:
        """An answer to an ask already cancelled (an abort for a request handed back: moot)."""
        if isinstance(msg, DecodeAllocation):
            self._hand_back(Answer(msg.request_id, msg.decode_instance, self, msg, late=True))

    def _cancel(self, ask: Ask, reason: str) -> None:
        with contextlib.suppress(ChannelError):  # D is gone; its lease frees the blocks
            self._senders.send(ask.peer_inbox, CancelDecode(ask.request_id, reason))
